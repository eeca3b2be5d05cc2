"""Inference-time scaling with process reward models: accuracy against compute for
best-of-N, majority vote, beam search, SMC with the PRM as its twist, and SMC steering,
with an exact, a noisy and a learned verifier.

    python examples/lm_scaling.py                 # the study: ~14 min of CPU on one thread (beam ~10)
    python examples/lm_scaling.py --quick         # ~25 s of CPU (CI): 16 problems, N <= 8
    python examples/lm_scaling.py --plot docs/lm_scaling.png --json examples/out/lm_scaling.json

The task. Add two 2-digit numbers (``DIGITS``), written step by step from the last
column, the carry written into the next step:

    prompt  "37+45:"      solution  "7+5=12;3+4+1=8;=82."

A solution has DIGITS column steps (each ended by ';') and the answer step ('=S', ended
by '.'). The language model is the small character-level GRU of ``ppl.stdlib.lm.small``
(65K parameters), trained here on 20,000 worked examples (1000 Adam steps, ~15 s of CPU,
seeded; cached under ``--cache``, default examples/out/; nothing is downloaded). It
solves about 40% of new problems from one sample: mostly it copies the wrong digits of a
column (the GRU has to remember the prompt's digits in reverse order), sometimes it adds
or carries wrongly.

The verifiers (process reward models: they score partial solutions).
``exact_verdicts(prompt, text)`` judges every completed step: step i is right iff it is
the i-th step of the worked solution (the same digits, the same carry, the right sum;
the answer step: the right sum). ``NoisyPRM(eps)`` reports those verdicts with errors:
each verdict is flipped (a wrong step called right, a right one called wrong) with
probability eps, by a hash of (seed, prompt, the text up to that step), so the same
partial solution always gets the same verdicts (an imperfect verifier's errors are
systematic, not fresh noise that asking again would average out); its score is minus the
number of steps it calls wrong. ``LearnedPRM`` is a small trained scorer (a GRU over
prompt + text, one logit per step) trained on the exact verdicts of the LM's own samples
for 400 other problems (~20 s of CPU, cached); its score is the sum of log P(step right);
its errors are whatever it did not learn (on held-out samples it calls ~82% of steps
right, with ~17% of wrong steps called right and ~19% of right ones called wrong: about
eps = 0.2, but not independent of the solution).

The methods (models in the DSL, ``SOURCE``; lam = ``--lam``, default 3):

* best-of-N: ``best_of_n`` on ``outcome_scored`` (N samples, each step drawn by
  ``lm.generate(..., stop=[";", "."])``, then ``factor lam * prm(prompt, text)``; the one
  the PRM scores best; ties to the first);
* majority vote: ``importance`` on ``outcome_scored`` (the same N samples as best-of-N
  from the same seed), the most frequent answer (ties to the first seen; no verifier);
  PRM-weighted vote: the answer with the most importance weight exp(lam * score);
* SMC: ``smc`` on ``prm_twisted``: N particles, after each step ``twist(lam * prm(...))``
  and a checkpoint, where SMC resamples; the target is p_LM(y) exp(lam * score(y)); its
  answer is the one with the most final weight (a weighted vote over the particles);
* SMC steering: ``smc_steer`` on ``prm_twisted``, N/4 parents x 4 children (N < 4: N x 1);
* beam search: ``method="beam"`` (beam width N) on ``prm_tokens`` (``method="beam"``
  expands ``lm.next_token`` choices, not ``lm.generate``: a loop of ``next_token`` with
  telescoping factors lam * (score(y_1:t) - score(y_1:t-1))); beams ranked by log p_LM +
  lam * score; deterministic (N = 1 is greedy decoding).

Compute is counted in tokens drawn: every next-token row the DSL asks for a particle (one
per particle and position, resampled copies included; ``counting_value``); the table also
gives the distinct rows the LM computed (``CountingLM``: equal contexts are asked once, so
SMC's resampled copies are cheaper there). Budgets N = 1, 2, 4, ..., 64. Accuracy: the
share of problems whose answer is the right sum, +- its standard error over problems
(each problem solved once per method, verifier and budget, from its own seed); method vs
best-of-N differences with paired SEs (the same problems).

The numbers of a full run, the plot and what they show are in examples/README.md.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import pathlib
import random
import sys
import time
from typing import Sequence

HERE = pathlib.Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

import torch  # noqa: E402

torch.set_num_threads(1)

import ppl  # noqa: E402
from ppl.stdlib.lm.base import LanguageModel, RewardModel  # noqa: E402

DIGITS = 2
STEP_MAX_TOKENS = 12        # longest step "9+9+1=19;" is 9 characters
SOLUTION_MAX_TOKENS = 24    # beam search's fixed loop; the longest solution "9+9=18;9+9+1=19;=198." is 21
FORMAT = "ppl-arith-lm/1"

# ------------------------------------------------------------------------------- task


def problem_prompt(a: int, b: int) -> str:
    return f"{a}+{b}:"


def worked_steps(a: int, b: int, digits: int = DIGITS) -> list[str]:
    """The worked solution of a + b, step by step, each step with its terminator."""
    da = [int(c) for c in str(a).zfill(digits)][::-1]
    db = [int(c) for c in str(b).zfill(digits)][::-1]
    steps, carry = [], 0
    for x, y in zip(da, db):
        s = x + y + carry
        steps.append(f"{x}+{y}" + ("+1" if carry else "") + f"={s};")
        carry = s // 10
    return steps + [f"={a + b}."]


def parse_prompt(prompt: str) -> tuple[int, int]:
    a, b = str(prompt).rstrip(":").split("+")
    return int(a), int(b)


def split_steps(text: str) -> tuple[list[str], str]:
    """The completed steps of a partial solution (each with its terminator ';' or '.') and
    the unfinished rest."""
    steps, cur = [], ""
    for ch in str(text):
        cur += ch
        if ch in ";.":
            steps.append(cur)
            cur = ""
    return steps, cur


def exact_verdicts(prompt: str, text: str) -> list[bool]:
    """The exact checker: for each completed step of ``text``, whether it is right (the
    i-th step of the worked solution; the answer step '=S.' is right iff S = a + b, and a
    step after the answer step is wrong)."""
    a, b = parse_prompt(prompt)
    want = worked_steps(a, b, len(str(max(a, b))))
    steps, _ = split_steps(text)
    return [i < len(want) and s == want[i] for i, s in enumerate(steps)]


def final_answer(text: str) -> str | None:
    """The answer of a finished solution (the number in its '=S.' step), else None."""
    steps, rest = split_steps(text)
    if rest or not steps or not steps[-1].startswith("=") or not steps[-1].endswith("."):
        return None
    return steps[-1][1:-1]


def is_correct(prompt: str, text: str) -> bool:
    a, b = parse_prompt(prompt)
    return final_answer(text) == str(a + b)


def problems(n: int, seed: int, digits: int = DIGITS) -> list[tuple[int, int]]:
    """``n`` problems (a, b) with ``digits``-digit numbers, from ``seed``."""
    rnd = random.Random(seed)
    lo, hi = 10 ** (digits - 1), 10 ** digits
    return [(rnd.randrange(lo, hi), rnd.randrange(lo, hi)) for _ in range(n)]


# ------------------------------------------------------------------------ the verifier
def _unit(*parts) -> float:
    """A uniform number in [0, 1) fixed by ``parts`` (a hash: the same on every run)."""
    h = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2.0 ** 64


class NoisyPRM(RewardModel):
    """The exact step checker, each verdict flipped with probability ``eps`` (see the
    module docstring). ``score`` = minus the number of completed steps called wrong."""

    def __init__(self, eps: float, seed: int = 0):
        if not 0.0 <= eps <= 1.0:
            raise ValueError(f"NoisyPRM: eps must be in [0, 1], got {eps!r}")
        self.eps, self.seed = float(eps), seed
        self.name = f"prm(eps={eps:g})"
        self.calls = 0

    def verdicts(self, prompt: str, text: str) -> list[bool]:
        steps, _ = split_steps(text)
        out, upto = [], ""
        for s, right in zip(steps, exact_verdicts(prompt, text)):
            upto += s
            flip = self.eps > 0 and _unit(self.seed, prompt, upto) < self.eps
            out.append(right != flip)
        return out

    def score_one(self, prompt: str, text: str) -> float:
        return -float(sum(not v for v in self.verdicts(prompt, text)))

    def score(self, prompts: Sequence[str], texts: Sequence[str]) -> torch.Tensor:
        self.calls += 1
        return torch.tensor([self.score_one(p, t) for p, t in zip(prompts, texts)], dtype=torch.float64)


class LearnedPRM(RewardModel):
    """A small trained scorer: a character GRU read over prompt + partial solution whose
    output at each step's terminator is the logit of P(that step is right). Trained on
    the exact checker's verdicts of the task LM's own samples (``train_learned_prm``), so
    its errors are whatever it failed to learn, not injected noise. ``score`` = the sum
    over completed steps of log P(step right): the log-probability it gives that every
    step so far is right (0 for a text with no completed step)."""

    def __init__(self, chars: str = "0123456789+=:;.", hidden: int = 64, seed: int = 0):
        from torch import nn
        self.chars = chars
        self.stoi = {c: i + 1 for i, c in enumerate(chars)}  # 0: padding / unknown
        self.hidden = hidden
        g = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2 ** 31, (1,), generator=g)))
            self.emb = nn.Embedding(len(chars) + 1, 16)
            self.gru = nn.GRU(16, hidden, batch_first=True)
            self.head = nn.Linear(hidden, 1)
        self.name = "learned-prm"
        self.info: dict = {}

    def modules(self):
        return [self.emb, self.gru, self.head]

    def _logits(self, strings: Sequence[str]) -> list[torch.Tensor]:
        """Per string, the logits at every position (one forward pass for the batch)."""
        from torch import nn
        ids = [[self.stoi.get(c, 0) for c in s] or [0] for s in strings]
        L = max(len(x) for x in ids)
        x = torch.zeros(len(ids), L, dtype=torch.long)
        for i, row in enumerate(ids):
            x[i, :len(row)] = torch.tensor(row)
        packed = nn.utils.rnn.pack_padded_sequence(self.emb(x), torch.tensor([len(r) for r in ids]),
                                                   batch_first=True, enforce_sorted=False)
        out, _ = self.gru(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=L)
        logits = self.head(out).squeeze(-1)
        return [logits[i, :len(r)] for i, r in enumerate(ids)]

    @staticmethod
    def _ends(prompt: str, text: str) -> list[int]:
        """Positions (in prompt + text) of the completed steps' terminators."""
        return [len(prompt) + i for i, ch in enumerate(str(text)) if ch in ";."]

    def step_probs(self, prompt: str, text: str) -> list[float]:
        with torch.no_grad():
            lg = self._logits([str(prompt) + str(text)])[0]
        return [float(torch.sigmoid(lg[j])) for j in self._ends(prompt, text)]

    def score(self, prompts: Sequence[str], texts: Sequence[str]) -> torch.Tensor:
        with torch.no_grad():
            logits = self._logits([str(p) + str(t) for p, t in zip(prompts, texts)])
        out = []
        for lg, p, t in zip(logits, prompts, texts):
            ends = self._ends(p, t)
            out.append(float(torch.nn.functional.logsigmoid(lg[ends]).sum()) if ends else 0.0)
        return torch.tensor(out, dtype=torch.float64)


def sampled_solutions(lm, prompts: Sequence[str], per_prompt: int, seed: int) -> list[tuple[str, str]]:
    """(prompt, solution) pairs: ``per_prompt`` samples of the task LM per prompt (the
    ``plain`` DSL model, ``importance``)."""
    model = ppl.model(SOURCE, entry="plain")
    out = []
    for i, p in enumerate(prompts):
        res = model.run("importance", {"lm": lm, "prompt": p, "max_steps": DIGITS + 2,
                                       "step_tokens": STEP_MAX_TOKENS}, particles=per_prompt, seed=seed + i)
        out += [(p, str(t)) for t in res.samples["return"]]
    return out


def train_learned_prm(lm, cache, n_problems: int = 400, per_problem: int = 8, steps: int = 600, seed: int = 0,
                      verbose: bool = True) -> LearnedPRM:
    """Train (or load from ``cache``) the learned PRM on the exact verdicts of the task
    LM's samples for ``n_problems`` training problems (another seed than the test
    problems'); its step accuracy on samples for 200 held-out problems goes in
    ``prm.info``."""
    path = pathlib.Path(cache) / f"learned_prm_n{n_problems}x{per_problem}_s{steps}_seed{seed}.pt"
    prm = LearnedPRM(seed=seed)
    t0 = time.process_time()
    if path.exists():
        blob = torch.load(path, weights_only=True)
        for m, sd in zip(prm.modules(), blob["modules"]):
            m.load_state_dict(sd)
        prm.info = dict(blob["info"])
        how = "loaded"
    else:
        def labelled(pairs):
            return [(p + t, LearnedPRM._ends(p, t), exact_verdicts(p, t)) for p, t in pairs if LearnedPRM._ends(p, t)]
        train_set = labelled(sampled_solutions(lm, [problem_prompt(a, b) for a, b in problems(n_problems, seed + 777)],
                                               per_problem, seed))
        held = labelled(sampled_solutions(lm, [problem_prompt(a, b) for a, b in problems(200, seed + 888)], 4, seed))
        params = [q for m in prm.modules() for q in m.parameters()]
        opt = torch.optim.Adam(params, lr=1e-2)
        g = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            batch = [train_set[int(i)] for i in torch.randint(0, len(train_set), (64,), generator=g)]
            logits = prm._logits([s for s, _, _ in batch])
            lg = torch.cat([l[e] for l, (_, e, _) in zip(logits, batch)])
            y = torch.tensor([float(v) for _, _, vs in batch for v in vs])
            loss = torch.nn.functional.binary_cross_entropy_with_logits(lg, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            logits = prm._logits([s for s, _, _ in held])
        pred = [bool(l[e_] > 0) for l, (_, e, _) in zip(logits, held) for e_ in e]
        truth = [v for _, _, vs in held for v in vs]
        wrong_called_right = sum(p and not t for p, t in zip(pred, truth)) / max(1, sum(not t for t in truth))
        right_called_wrong = sum(t and not p for p, t in zip(pred, truth)) / max(1, sum(truth))
        prm.info = {"step_accuracy": sum(p == t for p, t in zip(pred, truth)) / len(truth),
                    "right_share": sum(truth) / len(truth),
                    "wrong_called_right": wrong_called_right, "right_called_wrong": right_called_wrong,
                    "held_out_steps": len(truth), "train_steps_labelled": sum(len(vs) for _, _, vs in train_set),
                    "last_loss": float(loss.detach())}
        torch.save({"modules": [m.state_dict() for m in prm.modules()], "info": prm.info}, path)
        how = f"trained ({steps} steps)"
    if verbose:
        i = prm.info
        print(f"learned PRM: {how} {path.name} in {time.process_time() - t0:.1f} s CPU; on {i['held_out_steps']} "
              f"held-out steps: accuracy {i['step_accuracy']:.3f}, wrong steps called right "
              f"{i['wrong_called_right']:.3f}, right steps called wrong {i['right_called_wrong']:.3f}")
    return prm


# ------------------------------------------------------------------------ the LM
class CountingLM(LanguageModel):
    """A language model that counts the rows (contexts) it is asked about: the compute
    spent, in tokens. Everything else is the wrapped model's."""

    def __init__(self, lm: LanguageModel):
        self.inner = lm
        self.name = getattr(lm, "name", "lm")
        self.eos_id = lm.eos_id
        self.rows = 0

    @property
    def vocab_size(self) -> int:
        return self.inner.vocab_size

    def encode(self, text):
        return self.inner.encode(text)

    def decode(self, ids):
        return self.inner.decode(ids)

    def token_text(self, token_id):
        return self.inner.token_text(token_id)

    def next_logprobs(self, contexts):
        self.rows += len(contexts)
        return self.inner.next_logprobs(contexts)


def training_corpus(n: int, seed: int, digits: int = DIGITS) -> list[str]:
    """``n`` worked examples (prompt + solution), from ``seed`` (disjoint in practice from
    the test problems: another seed)."""
    return [problem_prompt(a, b) + "".join(worked_steps(a, b, digits)) for a, b in problems(n, seed, digits)]


def task_lm(cache: str | os.PathLike, steps: int, seed: int = 0, digits: int = DIGITS, hidden: int = 128,
            verbose: bool = True):
    """The small LM trained on worked examples: loaded from the cache file named by the
    settings, or trained (``steps`` Adam steps, ``seed``) and saved there."""
    from ppl.stdlib.lm.small import SmallLM, train
    cache = pathlib.Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"arith_lm_d{digits}_s{steps}_h{hidden}_seed{seed}.pt"
    t0 = time.process_time()
    if path.exists():
        lm, how = SmallLM.load(path), "loaded"
    else:
        lm = train(training_corpus(20000, seed + 1000, digits), steps=steps, seed=seed, hidden=hidden, seq_len=48)
        lm.save(path)
        how = f"trained ({steps} steps)"
    if verbose:
        loss = lm.train_info.get("losses", [float("nan")])[-1]
        print(f"arithmetic LM: {how} {path} in {time.process_time() - t0:.1f} s CPU; {lm.vocab_size} tokens, "
              f"{lm.num_parameters} parameters, last training loss {loss:.3f} nats/char")
    return lm


# ------------------------------------------------------------------------ the models
SOURCE = '''
def plain(lm, prompt, max_steps, step_tokens):
    toks = lm.encode(prompt)
    text = ""
    done = False
    for s in range(max_steps):
        if not done:
            step ~ lm.generate(toks, max_tokens=step_tokens, stop=[";", "."])
            toks = toks + [step]
            text = text + step
            done = not (";" in step)
    return text

def outcome_scored(lm, prm, prompt, max_steps, step_tokens, lam):
    text = plain(lm, prompt, max_steps, step_tokens)
    factor lam * prm(prompt, text)
    return text

def prm_twisted(lm, prm, prompt, max_steps, step_tokens, lam):
    toks = lm.encode(prompt)
    text = ""
    done = False
    for s in range(max_steps):
        if not done:
            step ~ lm.generate(toks, max_tokens=step_tokens, stop=[";", "."])
            toks = toks + [step]
            text = text + step
            done = not (";" in step)
        twist(lam * prm(prompt, text))
        factor 0  # a checkpoint: SMC resamples here (a twist alone is none)
    twist(0)
    factor lam * prm(prompt, text)
    return text

def prm_tokens(lm, prm, prompt, max_tokens, lam):
    toks = lm.encode(prompt)
    text = ""
    r_old = 0
    for t in range(max_tokens):
        tok ~ lm.next_token(toks)
        toks = toks + [tok]
        text = text + tok
        r_new = lam * prm(prompt, text)
        factor r_new - r_old  # telescoping: the factors sum to lam * prm(final text)
        r_old = r_new
    return text
'''


def counting_value(lm: CountingLM):
    """Attach to ``lm`` the DSL value that counts the tokens the particles draw: every
    row of the next-token question the DSL asks for the particles (one per particle and
    position, copies included), before it merges equal contexts into one backend row
    (those ``lm.rows`` counts). ``lm.sampled`` is that count."""
    from ppl.stdlib.lm import dsl

    class _Counting(dsl.LMValue):
        def base_logprobs(self, contexts, device):
            lm.sampled += sum(1 for c in contexts if not self.finished(c))
            return super().base_logprobs(contexts, device)

    if not hasattr(dsl.LMValue, "base_logprobs"):  # the DSL's funnel moved: say so, count nothing wrong
        raise RuntimeError("lm_scaling: stdlib.lm.dsl.LMValue.base_logprobs is gone; the token counter needs "
                           "the DSL's one place that asks for next-token rows")
    lm.sampled = 0
    lm._ppl_dsl_value = _Counting(lm)
    return lm


# ------------------------------------------------------------------------ the study
BUDGETS = (1, 2, 4, 8, 16, 32, 64)
EPSILONS = (0.0, 0.2)
LEARNED = "learned"  # the verifier key of the learned PRM (the others are eps values)


def verifier_name(v) -> str:
    """'eps = 0.2', 'learned PRM', or 'none' (majority vote)."""
    return "none" if v is None else "learned PRM" if v == LEARNED else f"eps = {v:g}"


LABELS = {"best_of_n": "best-of-N (PRM)", "majority": "majority vote", "weighted_majority": "PRM-weighted vote",
          "smc": "SMC, PRM twist", "smc_steer": "SMC steer (x4), PRM twist", "beam": "beam search (PRM)"}


def heaviest_answer(texts, weights) -> str | None:
    """The answer with the most total weight among finished solutions (ties: the first
    seen); None if no text is a finished solution."""
    tot: dict = {}
    for t, w in zip(texts, weights):
        a = final_answer(str(t))
        if a is not None:
            tot[a] = tot.get(a, 0.0) + float(w)
    return max(tot, key=tot.get) if tot else None


class Study:
    """The models, the LM with its counters, and one run of a method on one problem."""

    def __init__(self, lm, lam: float, seed: int = 0, prm_seed: int = 0, learned: LearnedPRM | None = None):
        self.lm = counting_value(CountingLM(lm))
        self.learned = learned
        self.lam, self.seed, self.prm_seed = lam, seed, prm_seed
        self.models = {e: ppl.model(SOURCE, entry=e) for e in ("plain", "outcome_scored", "prm_twisted", "prm_tokens")}
        self.prms = {}
        self.has_beam = _has_method("beam")

    def prm(self, eps) -> RewardModel:
        """The verifier ``eps``: NoisyPRM(eps), or the learned PRM for ``LEARNED``."""
        if eps == LEARNED:
            if self.learned is None:
                raise ValueError("lm_scaling: no learned PRM was given to this Study")
            return self.learned
        if eps not in self.prms:
            self.prms[eps] = NoisyPRM(eps, self.prm_seed)
        return self.prms[eps]

    def data(self, prompt: str, eps: float | None) -> dict:
        d = {"lm": self.lm, "prompt": prompt, "max_steps": DIGITS + 2, "step_tokens": STEP_MAX_TOKENS}
        if eps is not None:
            d.update(prm=self.prm(eps), lam=self.lam)
        return d

    def solve(self, method: str, prompt: str, n: int, eps: float | None, seed: int) -> dict:
        """Run ``method`` with budget ``n`` on one problem: its answer (a text or None),
        whether it is right, the tokens the particles drew and the backend rows."""
        self.lm.rows = self.lm.sampled = 0
        out = getattr(self, "_" + method)(prompt, n, eps, seed)
        answers = out if isinstance(out, tuple) else (out,)
        return {"answers": answers, "correct": tuple(a == str(sum(parse_prompt(prompt))) for a in answers),
                "tokens": self.lm.sampled, "rows": self.lm.rows}

    # one function per method: the answer (majority: both votes)
    def _best_of_n(self, prompt, n, eps, seed):
        res = self.models["outcome_scored"].run("best_of_n", self.data(prompt, eps), particles=n, seed=seed)
        return final_answer(str(res.samples["return"][0]))

    def _majority(self, prompt, n, eps, seed):
        """Unweighted and PRM-weighted votes over the same N samples (eps: the PRM's)."""
        res = self.models["outcome_scored"].run("importance", self.data(prompt, eps), particles=n, seed=seed)
        texts = res.samples["return"]
        return heaviest_answer(texts, [1.0] * len(texts)), heaviest_answer(texts, res.weights.tolist())

    def _smc(self, prompt, n, eps, seed):
        res = self.models["prm_twisted"].run("smc", self.data(prompt, eps), particles=n, seed=seed)
        return heaviest_answer(res.samples["return"], res.weights.tolist())

    def _smc_steer(self, prompt, n, eps, seed):
        k = min(4, n)
        res = self.models["prm_twisted"].run("smc_steer", self.data(prompt, eps), particles=n // k, expansion=k,
                                             seed=seed)
        return heaviest_answer(res.samples["return"], res.weights.tolist())

    def _beam(self, prompt, n, eps, seed):
        data = {k: v for k, v in self.data(prompt, eps).items() if k not in ("max_steps", "step_tokens")}
        res = self.models["prm_tokens"].run("beam", {**data, "max_tokens": SOLUTION_MAX_TOKENS}, beam_width=n,
                                            seed=seed)
        return final_answer(str(res.samples["return"][0]))


def _has_method(name: str) -> bool:
    from ppl.inference.methods import METHODS
    return name in METHODS


def run_study(lm, n_problems: int, budgets=BUDGETS, epsilons=EPSILONS, lam: float = 3.0, seed: int = 0,
              methods=("best_of_n", "majority", "smc", "smc_steer", "beam"), verbose: bool = True,
              learned: LearnedPRM | None = None) -> dict:
    """Every method at every budget and verifier error rate on ``n_problems`` problems
    (seed ``seed``; problem i's runs use seed ``seed + 1000 * i + N``); ``epsilons``
    may include ``LEARNED`` (the ``learned`` PRM). Returns
    {"runs": {(method, eps, N): [per-problem records]}, ...}; majority vote's unweighted
    vote is stored as ("majority", None, N)."""
    study = Study(lm, lam, seed, learned=learned)
    if "beam" in methods and not study.has_beam:
        methods = tuple(m for m in methods if m != "beam")
        if verbose:
            print("beam search: skipped (this ppl has no method='beam' yet)")
    probs = problems(n_problems, seed + 12345)
    runs: dict = {}
    t0 = time.process_time()
    for method in methods:
        for eps in epsilons:
            for n in budgets:
                for i, (a, b) in enumerate(probs):
                    r = study.solve(method, problem_prompt(a, b), n, eps, seed + 1000 * i + n)
                    if method == "majority":
                        if eps == epsilons[0]:
                            runs.setdefault(("majority", None, n), []).append(_one(r, 0))
                        runs.setdefault(("weighted_majority", eps, n), []).append(_one(r, 1))
                    else:
                        runs.setdefault((method, eps, n), []).append(_one(r, 0))
            if verbose:
                print(f"  {LABELS[method]:<28} {verifier_name(eps):<12} done ({time.process_time() - t0:6.1f} s CPU)", flush=True)
    return {"runs": runs, "problems": probs, "budgets": list(budgets), "epsilons": list(epsilons), "lam": lam,
            "cpu_s": time.process_time() - t0}


def _one(r: dict, k: int) -> dict:
    return {"answer": r["answers"][k], "correct": r["correct"][k], "tokens": r["tokens"], "rows": r["rows"]}


def mean_se(xs) -> tuple[float, float]:
    xs = [float(x) for x in xs]
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, float("nan")
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))


def summarise(study: dict) -> dict:
    """{(method, eps, N): {"acc", "acc_se", "tokens", "rows", "n"}}: accuracy +- SE over
    problems, mean tokens drawn and backend rows per problem."""
    out = {}
    for key, recs in study["runs"].items():
        acc, se = mean_se([r["correct"] for r in recs])
        out[key] = {"acc": acc, "acc_se": se, "tokens": mean_se([r["tokens"] for r in recs])[0],
                    "rows": mean_se([r["rows"] for r in recs])[0], "n": len(recs)}
    return out


# ------------------------------------------------------------------------ output
METHOD_ORDER = ("best_of_n", "weighted_majority", "majority", "beam", "smc", "smc_steer")
COLORS = {"best_of_n": "tab:blue", "weighted_majority": "tab:cyan", "majority": "tab:gray", "beam": "tab:purple",
          "smc": "tab:red", "smc_steer": "tab:orange"}


def rows_for(summary: dict, eps: float) -> list[tuple[str, float | None]]:
    """The (method, eps key) lines shown for verifier error rate ``eps``, in order
    (majority vote, which uses no verifier, under every eps)."""
    keys = {(m, e) for (m, e, _) in summary}
    out = []
    for m in METHOD_ORDER:
        for e in ((None,) if m == "majority" else (eps,)):
            if (m, e) in keys:
                out.append((m, e))
    return out


def markdown_table(summary: dict, budgets, epsilons) -> str:
    """Accuracy +- SE per method and budget, one block per eps; then the mean tokens
    drawn (and backend rows) per problem."""
    lines = []
    n = next(iter(summary.values()))["n"]
    head = "| verifier | method | " + " | ".join(f"N = {b}" for b in budgets) + " |"
    lines += [f"Accuracy (share of {n} problems answered right, +- SE over problems):", "", head,
              "|" + "---|" * (len(budgets) + 2)]
    for eps in epsilons:
        for m, e in rows_for(summary, eps):
            cells = [f"{summary[(m, e, b)]['acc']:.3f} +- {summary[(m, e, b)]['acc_se']:.3f}" for b in budgets]
            ver = verifier_name(e)
            lines.append(f"| {ver} | {LABELS[m]} | " + " | ".join(cells) + " |")
    lines += ["", "Compute per problem (mean over problems and verifiers): tokens drawn by the particles / "
              "distinct next-token rows the LM computed:", "",
              "| method | " + " | ".join(f"N = {b}" for b in budgets) + " |", "|" + "---|" * (len(budgets) + 1)]
    for m in METHOD_ORDER:
        keys = [(mm, e) for (mm, e, _) in summary if mm == m]
        if not keys:
            continue
        cells = []
        for b in budgets:
            recs = [summary[(mm, e, b)] for (mm, e) in set(keys)]
            cells.append(f"{sum(r['tokens'] for r in recs) / len(recs):.0f} / {sum(r['rows'] for r in recs) / len(recs):.0f}")
        lines.append(f"| {LABELS[m]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(summary: dict, budgets, epsilons, path, title: str = "") -> None:
    """Accuracy (+- SE) against tokens drawn per problem, one panel per eps."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(epsilons), figsize=(5.2 * len(epsilons), 4.2), sharey=True, squeeze=False)
    for ax, eps in zip(axes[0], epsilons):
        for m, e in rows_for(summary, eps):
            pts = [summary[(m, e, b)] for b in budgets]
            ax.errorbar([p["tokens"] for p in pts], [p["acc"] for p in pts], yerr=[p["acc_se"] for p in pts],
                        marker="o", ms=3.5, capsize=2, lw=1.4, color=COLORS[m], label=LABELS[m],
                        ls="--" if m in ("majority", "weighted_majority") else "-")
        for b, p in zip(budgets, [summary[("best_of_n", eps, b)] for b in budgets] if ("best_of_n", eps, budgets[0]) in summary else []):
            ax.annotate(f"N={b}", (p["tokens"], 0.0), textcoords="offset points", xytext=(0, 2), ha="center",
                        fontsize=7, color="0.4")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens drawn per problem (all particles)")
        ax.set_title("learned PRM (a small trained GRU)" if eps == LEARNED else
                     f"noisy verifier, error rate eps = {eps:g}" if eps else "exact verifier (eps = 0)")
        ax.grid(alpha=0.3)
        ax.set_ylim(0, 1.02)
    axes[0][0].set_ylabel("accuracy (share of problems right)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=len(labels), frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def paired_differences(study: dict, base: str = "best_of_n") -> dict:
    """{(method, eps, N): (mean, SE)} of the per-problem difference in correctness
    between ``method`` and ``base`` at the same eps and N (the same problems: a paired
    SE, smaller than the two SEs combined)."""
    runs = study["runs"]
    out = {}
    for (m, e, b), recs in runs.items():
        other = runs.get((base, e, b))
        if other is None or m == base:
            continue
        out[(m, e, b)] = mean_se([float(r["correct"]) - float(o["correct"]) for r, o in zip(recs, other)])
    return out


def findings(summary: dict, budgets, epsilons, paired: dict) -> list[str]:
    """Plain statements read off the numbers: where a particle method beats best-of-N by
    more than two paired SEs (or loses by as much), and where a method stops gaining
    (from the middle budget to the largest it gains no more than 2 SE)."""
    out = []
    for eps in epsilons:
        for m in ("smc", "smc_steer", "beam", "weighted_majority"):
            if (m, eps, budgets[0]) not in summary or ("best_of_n", eps, budgets[0]) not in summary:
                continue
            wins = []
            for b in budgets:
                d, se = paired[(m, eps, b)]
                wins.append((b, d, se))
            better = [f"N={b} (+{d:.3f} +- {se:.3f})" for b, d, se in wins if se > 0 and d > 2 * se]
            worse = [f"N={b} ({d:.3f} +- {se:.3f})" for b, d, se in wins if se > 0 and d < -2 * se]
            out.append(f"{verifier_name(eps)}: {LABELS[m]} vs best-of-N: better by > 2 SE at "
                       f"{', '.join(better) or 'no budget'}; worse by > 2 SE at {', '.join(worse) or 'no budget'}")
        for m, e in rows_for(summary, eps):
            if e is None and eps != epsilons[0]:
                continue  # majority vote: once
            accs = [summary[(m, e, b)] for b in budgets]
            half = accs[len(accs) // 2]
            last = accs[-1]
            gain, se = last["acc"] - half["acc"], math.hypot(last["acc_se"], half["acc_se"])
            if gain <= 2 * se:
                out.append(f"{verifier_name(e)}: {LABELS[m]} stops helping: from N={budgets[len(accs) // 2]} "
                           f"({half['acc']:.3f}) to N={budgets[-1]} ({last['acc']:.3f}) it gains {gain:+.3f} +- {se:.3f}")
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--problems", type=int, default=None, help="problems per point (default 200; --quick 16)")
    p.add_argument("--budgets", type=int, nargs="+", default=None, help="N values (default 1 2 4 ... 64; --quick 1 2 4 8)")
    p.add_argument("--eps", type=float, nargs="+", default=list(EPSILONS), help="verifier error rates (default 0 0.2)")
    p.add_argument("--no-learned", action="store_true", help="leave out the learned PRM")
    p.add_argument("--prm-steps", type=int, default=None, help="training steps of the learned PRM (default 600; --quick 300)")
    p.add_argument("--lam", type=float, default=3.0, help="PRM weight: potential lam * score (default 3)")
    p.add_argument("--methods", nargs="+", default=None, help=f"subset of {', '.join(METHOD_ORDER[:1] + ('majority', 'smc', 'smc_steer', 'beam'))}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default=str(HERE / "out"), help="directory of the trained LM (default examples/out)")
    p.add_argument("--train-steps", type=int, default=1000, help="training steps of the arithmetic LM (default 1000)")
    p.add_argument("--plot", default=str(HERE / "out" / "lm_scaling.png"), help="the PNG (default examples/out/lm_scaling.png; '' for none)")
    p.add_argument("--json", default="", help="write the summary as JSON here")
    p.add_argument("--quick", action="store_true", help="16 problems, N = 1 2 4 8, a quicker learned PRM: under a minute (CI)")
    args = p.parse_args(argv)
    problems_n = args.problems or (16 if args.quick else 200)
    budgets = tuple(args.budgets or ((1, 2, 4, 8) if args.quick else BUDGETS))
    methods = tuple(args.methods or ("best_of_n", "majority", "smc", "smc_steer", "beam"))
    import warnings
    from ppl.semantics.errors import PPLDiagnosticWarning
    t0 = time.process_time()
    lm = task_lm(args.cache, args.train_steps, seed=args.seed)
    verifiers = list(args.eps)
    learned = None
    if not args.no_learned:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PPLDiagnosticWarning)
            learned = train_learned_prm(lm, args.cache, n_problems=150 if args.quick else 400,
                                        steps=args.prm_steps or (300 if args.quick else 600), seed=args.seed)
        verifiers.append(LEARNED)
    print(f"task: {DIGITS}-digit addition in steps, e.g. {problem_prompt(37, 45)!r} -> "
          f"{''.join(worked_steps(37, 45))!r}; {problems_n} problems, N in {list(budgets)}, verifiers {verifiers}, "
          f"lam = {args.lam:g}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PPLDiagnosticWarning)  # importance's low-ESS notes: expected here
        study = run_study(lm, problems_n, budgets, tuple(verifiers), args.lam, args.seed, methods, learned=learned)
    summary = summarise(study)
    table = markdown_table(summary, budgets, verifiers)
    print("\n" + table + "\n")
    paired = paired_differences(study)
    notes = findings(summary, budgets, verifiers, paired)
    for line in notes:
        print("  " + line)
    cpu = time.process_time() - t0
    print(f"\nCPU time: {cpu:.1f} s in all ({study['cpu_s']:.1f} s the study); load average {_loadavg()}")
    if args.plot:
        pathlib.Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        plot(summary, budgets, verifiers, args.plot,
             f"{DIGITS}-digit addition in steps, small GRU LM, {problems_n} problems per point (+- 1 SE)")
        print(f"plot: {args.plot}")
    out = {"summary": summary, "table": table, "findings": notes, "study": study, "cpu_s": cpu,
           "budgets": list(budgets), "verifiers": verifiers, "learned_prm": None if learned is None else learned.info}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": {f"{m}|{e}|{b}": v for (m, e, b), v in summary.items()}, "table": table,
                       "findings": notes, "cpu_s": cpu,
                       "paired_vs_best_of_n": {f"{m}|{e}|{b}": v for (m, e, b), v in paired.items()}, "learned_prm": out["learned_prm"]}, f, indent=1)
    return out


def _loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "n/a"


if __name__ == "__main__":
    main()
