"""Hugging Face ``transformers`` backends, loaded from local directories only.

* ``HFCausalLM(path_or_model, tokenizer=None, device="cpu", dtype=None)``: any causal LM
  (``AutoModelForCausalLM``) whose KV cache is a plain ``DynamicCache`` of full-attention
  layers (GPT-2, Llama, Qwen, ...). Loading passes ``local_files_only=True``: a directory
  written by ``save_pretrained`` or a model already in the local Hugging Face cache;
  nothing is ever downloaded. A missing model is a ``PPLError``.
* ``HFRewardModel(path_or_model, tokenizer=None, label=None, template=None, ...)``: an
  ``AutoModelForSequenceClassification``; the score of a (prompt, text) pair is the logit
  of ``label`` (an index or a name from ``config.label2id``), or the single logit of a
  one-label model (the usual reward-model head).

Batching and caching in ``HFCausalLM.next_logprobs`` (one forward pass per call): each
distinct context starts from its longest cached prefix (see ``cache.py``: KV caches keyed
by the token prefix, whole-context entries, evicted when unused for ``keep_calls`` calls
or beyond ``max_cache_bytes``) and feeds only its new tokens. A batch row is laid out as

    [ cached keys/values of the prefix, LEFT-padded to the longest prefix P |
      the new tokens, RIGHT-padded to the most new tokens M ]

so the real columns of every row are one contiguous run [P - p_i, P + n_i). The 2-D
attention mask is 0 on every pad column; position ids count real tokens only (new token
j of row i is at position p_i + j); the next-token logits of row i are read at new
column n_i - 1. Right-padding the new tokens means every pad query still sees a real
key before it, so no attention row is fully masked (no NaN can reach a kept column).
After the pass, row i's real columns (all layers, stored token-major so that a batch's
prefixes are gathered with one cat and one index_copy) become the cache entry of its
context. The answer equals an unbatched, uncached forward pass of each context (tested
to 1e-5).
"""
from __future__ import annotations

import inspect
import os
from typing import Sequence

import torch

from ...semantics.errors import PPLError
from .base import RewardModel
from .cache import PrefixCachedLM


def _model_and_tokenizer(tf, auto_cls, what: str, owner: str, path_or_model, tokenizer, dtype, device):
    """(model on ``device`` in eval mode, tokenizer): each loaded from a local directory
    (``local_files_only``) when given as a path, else taken as the object given; the
    tokenizer defaults to the model's directory."""
    if isinstance(path_or_model, (str, os.PathLike)):
        model = _load(auto_cls, path_or_model, what, **_dtype_kwargs(tf, dtype))
        if tokenizer is None:
            tokenizer = path_or_model
    else:
        model = path_or_model
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = _load(tf.AutoTokenizer, tokenizer, "tokenizer")
    if tokenizer is None:
        raise PPLError(f"{owner} needs a tokenizer", hint="pass tokenizer= (an object or a local directory)")
    if dtype is not None:
        model = model.to(dtype)
    return model.to(device).eval(), tokenizer


def _transformers():
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - the 'lm' extra is installed by setup.sh
        raise PPLError("the Hugging Face backends need the 'transformers' package",
                       hint="pip install 'ppl[lm]'") from e
    return transformers


def _load(loader, path, what: str, **kwargs):
    """``loader.from_pretrained(path, local_files_only=True, trust_remote_code=False)``:
    nothing is downloaded and no Python code shipped in the directory ever runs (a
    config whose ``auto_map`` names custom code is refused, never prompted for). A model
    that is not on this machine, needs custom code, or whose files are damaged (e.g. a
    truncated ``model.safetensors``) is a ``PPLError`` naming the path."""
    try:
        return loader.from_pretrained(path, local_files_only=True, trust_remote_code=False, **kwargs)
    except (OSError, ValueError) as e:
        if "custom code" in str(e) or "trust_remote_code" in str(e):
            raise PPLError(f"refusing to load the {what} from {str(path)!r}: it needs custom Python code from "
                           "the model directory, which ppl never runs", hint="use a model of a type that "
                           "transformers implements itself (trust_remote_code is always False)") from None
        where = "directory" if os.path.isdir(str(path)) else "path or cached model"
        raise PPLError(f"cannot load the {what} from {str(path)!r}: {e}".replace("\n", " "),
                       hint=f"no such {where} with a {what} on this machine; ppl loads Hugging Face models "
                            "from local directories only (save_pretrained), it never downloads") from e
    except Exception as e:  # a damaged weights file: safetensors, torch or json errors
        if type(e).__name__ not in ("SafetensorError", "JSONDecodeError", "UnpicklingError", "RuntimeError", "EOFError"):
            raise
        raise PPLError(f"cannot load the {what} from {str(path)!r}: a file in it is damaged or truncated "
                       f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})",
                       hint="save the model again with save_pretrained, or copy the directory again") from None


def _dtype_kwargs(tf, dtype) -> dict:
    """Load in ``dtype`` directly (``dtype=`` since transformers 4.56, ``torch_dtype=`` before)."""
    if dtype is None:
        return {}
    major, minor = (int(x) for x in tf.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def _resolve_device(device) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


class HFCausalLM(PrefixCachedLM):
    """A ``transformers`` causal LM as a ppl ``LanguageModel`` (see the module docstring).

    ``path_or_model``: a local directory (or cached model id), or a loaded
    ``PreTrainedModel``; ``tokenizer``: a tokenizer object or directory (default: the
    model's directory). ``device``: "cpu", "cuda", "cuda:1", "auto"; ``dtype``: e.g.
    ``torch.float16`` (log-probs are always computed in float32). Log-probs come back on
    ``device``. ``vocab_size`` is the model's output size (it can exceed the tokenizer's
    length; such ids decode to nothing). Contexts must not be empty unless
    ``prefix_ids`` (e.g. ``(bos_id,)``) is given: those ids are prepended to every
    context before the model sees it (consistently, so caching is unaffected)."""

    def __init__(self, path_or_model, tokenizer=None, device="cpu", dtype=None, *,
                 use_cache: bool = True, max_cache_bytes: int = 1 << 30, keep_calls: int = 2,
                 prefix_ids: Sequence[int] = (), name: str | None = None):
        tf = _transformers()
        self.device = _resolve_device(device)
        self.model, self.tokenizer = _model_and_tokenizer(tf, tf.AutoModelForCausalLM, "causal language model",
                                                          "HFCausalLM", path_or_model, tokenizer, dtype, self.device)
        model, tokenizer = self.model, self.tokenizer
        self.dtype = next(self.model.parameters()).dtype
        self.name = name or f"hf:{getattr(model.config, 'model_type', 'lm')}"
        out = self.model.get_output_embeddings()
        self._vocab = int(out.weight.shape[0]) if out is not None else int(model.config.vocab_size)
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else getattr(model.config, "eos_token_id", None)
        self.eos_id = eos if isinstance(eos, int) else None
        self.prefix_ids = tuple(int(t) for t in prefix_ids)
        cfg = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
        self.max_positions = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        # transformers >= 5.x names the argument `cache` (`past_key_values` is deprecated)
        params = inspect.signature(self.model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._init_cache(use_cache, max_cache_bytes, keep_calls)

    # ------------------------------------------------------------------ text
    @property
    def vocab_size(self) -> int:
        return self._vocab

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False,
                                     clean_up_tokenization_spaces=False)

    # --------------------------------------------------------------- forward
    def _full(self, ctx: tuple) -> tuple:
        return self.prefix_ids + ctx if self.prefix_ids else ctx

    def _compute(self, items):
        dev = self.device
        fed = []  # (prefix length in model tokens, new model tokens)
        for ctx, n, state in items:
            full = self._full(ctx)
            p = 0 if state is None else len(self.prefix_ids) + n
            if len(full) == 0:
                raise PPLError(f"{self.name}: an empty context has no next-token distribution under this model",
                               hint="start from a prompt, or pass prefix_ids=(bos_id,) to HFCausalLM")
            if self.max_positions is not None and len(full) > self.max_positions:
                raise PPLError(f"{self.name}: a context of {len(full)} tokens is longer than the model's "
                               f"{self.max_positions} positions")
            fed.append((p, full[p:]))
        B = len(items)
        P = max(p for p, _ in fed)
        M = max(len(new) for _, new in fed)
        plen = torch.tensor([p for p, _ in fed])
        nlen = torch.tensor([len(new) for _, new in fed])
        ids = torch.tensor([list(new) + [0] * (M - len(new)) for _, new in fed], dtype=torch.long)
        cols = torch.arange(P + M)
        mask = ((cols >= P - plen[:, None]) & (cols < P + nlen[:, None])).long()
        pos = plen[:, None] + torch.arange(M)
        if self.max_positions is not None:
            pos.clamp_(max=self.max_positions - 1)  # pad columns only
        tf = _transformers()
        if P > 0:
            # states are token-major [L, layers, 2, heads, head_dim]: one cat of all
            # prefixes, one index_copy into the left-padded [B * P, ...] block
            prefixes = [s for _, _, s in items if s is not None]
            src = torch.cat(prefixes) if len(prefixes) > 1 else prefixes[0]
            dest = torch.nonzero((torch.arange(P) >= P - plen[:, None]).flatten())[:, 0]  # row-major
            past = src.new_zeros((B * P,) + tuple(src.shape[1:]))
            past.index_copy_(0, dest.to(src.device), src)
            past = past.view((B, P) + tuple(src.shape[1:])).permute(2, 3, 0, 4, 1, 5)  # [layers, 2, B, h, P, d]
            cache = tf.DynamicCache(ddp_cache_data=[(past[l, 0], past[l, 1]) for l in range(past.shape[0])])
        else:
            cache = tf.DynamicCache()
        out = self.model(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev),
                         use_cache=True, **{self._cache_kwarg: cache})
        logits = out.logits[torch.arange(B, device=dev), (nlen - 1).to(dev)].float()
        lps = torch.log_softmax(logits, dim=-1)
        states, sizes = [], []
        if self.use_cache:
            kv = self._stack(cache)  # updated in place by the forward pass: [layers, 2, B, h, P + M, d]
            kv = kv.permute(2, 4, 0, 1, 3, 5)  # [B, P + M, layers, 2, h, d] (a view)
            row_bytes = lps.shape[1] * lps.element_size()
            for i, (p, new) in enumerate(fed):
                st = kv[i, P - p:P + len(new)].clone()  # the row's real columns, token-major
                states.append(st)
                sizes.append(st.numel() * st.element_size() + row_bytes)
        return states, lps, sizes

    def _stack(self, cache) -> torch.Tensor:
        layers = getattr(cache, "layers", None)
        tf = _transformers()
        if layers is None or any(type(layer) is not tf.cache_utils.DynamicLayer for layer in layers):
            raise PPLError(f"{self.name}: this model's KV cache ({type(cache).__name__}) is not a plain full-attention "
                           "DynamicCache, which the prefix cache needs",
                           hint="pass use_cache=False (every context is then recomputed in one batched pass)")
        try:
            return torch.stack([torch.stack([layer.keys, layer.values]) for layer in layers])
        except RuntimeError as e:
            raise PPLError(f"{self.name}: the layers' KV caches have different shapes ({e})",
                           hint="pass use_cache=False") from e


class HFRewardModel(RewardModel):
    """A ``transformers`` sequence-classification model as a ppl ``RewardModel``.

    score(prompts, texts)[i] = the logit of ``label`` for the pair (prompts[i], texts[i]),
    or the only logit when the model has one label (``label`` must then be None or 0).
    The pair is encoded with the tokenizer's pair encoding (``tokenizer(prompt, text)``:
    separators/special tokens as the model was trained), or, with ``template`` (e.g.
    ``"{prompt}{text}"``), as that one formatted string. Batches are right-padded; a
    tokenizer without a pad token pads with its eos token (and the model's config learns
    that pad id, which GPT-2-style heads use to find the last real token). Scores are
    float32, on ``device``."""

    def __init__(self, path_or_model, tokenizer=None, device="cpu", dtype=None, *, label=None,
                 template: str | None = None, name: str | None = None):
        tf = _transformers()
        self.device = _resolve_device(device)
        self.model, self.tokenizer = _model_and_tokenizer(tf, tf.AutoModelForSequenceClassification,
                                                          "sequence-classification model", "HFRewardModel",
                                                          path_or_model, tokenizer, dtype, self.device)
        model, tokenizer = self.model, self.tokenizer
        self.template = template
        self.name = name or f"hf-reward:{getattr(model.config, 'model_type', 'rm')}"
        if tokenizer.pad_token_id is None:
            if tokenizer.eos_token is None:
                raise PPLError(f"{self.name}: the tokenizer has neither a pad nor an eos token to pad batches with",
                               hint="set tokenizer.pad_token before making the reward model")
            tokenizer.pad_token = tokenizer.eos_token
        if getattr(self.model.config, "pad_token_id", None) is None:
            self.model.config.pad_token_id = tokenizer.pad_token_id
        nl = int(self.model.config.num_labels)
        if isinstance(label, str):
            l2i = dict(getattr(self.model.config, "label2id", {}) or {})
            if label not in l2i:
                raise PPLError(f"{self.name}: no label {label!r}", hint=f"labels: {sorted(l2i)}")
            label = int(l2i[label])
        if label is None:
            if nl != 1:
                names = getattr(self.model.config, "id2label", {})
                raise PPLError(f"{self.name}: the model has {nl} labels; say which logit is the reward",
                               hint=f"pass label= one of {dict(names)}")
            label = 0
        if not 0 <= int(label) < nl:
            raise PPLError(f"{self.name}: label {label} is not in 0..{nl - 1}")
        self.label = int(label)

    @torch.no_grad()
    def score(self, prompts: Sequence[str], texts: Sequence[str]) -> torch.Tensor:
        prompts, texts = list(prompts), list(texts)
        if len(prompts) != len(texts):
            raise PPLError(f"{self.name}: {len(prompts)} prompts for {len(texts)} texts")
        if not texts:
            return torch.empty(0, device=self.device)
        kw = dict(padding=True, return_tensors="pt", padding_side="right")
        if self.template is None:
            enc = self.tokenizer(prompts, texts, **kw)
        else:
            enc = self.tokenizer([self.template.format(prompt=p, text=t) for p, t in zip(prompts, texts)], **kw)
        enc = {k: v.to(self.device) for k, v in enc.items()}
        logits = self.model(**enc).logits
        return logits[:, self.label].float()
