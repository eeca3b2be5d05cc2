"""A language model's vocabulary as a character trie, for masks of the whole vocabulary.

Each token's text is a path from the root; a node lists the ids of the tokens whose text
ends there (several ids may share a text). ``walk`` runs an incremental matcher
(``char_matcher``) down the trie: a character that kills the matcher prunes the whole
subtree below it, so one step's mask costs one matcher step per *live* trie node, not
one check per token, and tokens sharing a prefix share its steps. Characters inside a
token are checked one by one, so a constraint whose boundary falls inside a token is
decided exactly.

    trie = vocab_trie_of(lmv)                        # one per language-model value
    viable, complete = trie.walk(matcher.step, matcher.accepting, state)

``viable``: the ids whose text, appended to the text read so far (the matcher's
``state``), keeps a viable prefix; ``complete``: those after which the text is a whole
sentence. Tokens of empty text (other than the end-of-sequence token, which is never in
the trie) sit at the root: viable always, complete when ``state`` accepts.
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch


class VocabTrie:
    """The trie of token texts (see the module docstring)."""

    __slots__ = ("V", "children", "ids", "n_nodes", "__weakref__")

    def __init__(self, texts: Sequence[str], skip: Iterable[int] = ()):
        skip = set(skip)
        self.V = len(texts)
        children: list[dict] = [{}]
        ids: list[list] = [[]]
        for i, text in enumerate(texts):
            if i in skip:
                continue
            node = 0
            for ch in text:
                nxt = children[node].get(ch)
                if nxt is None:
                    nxt = children[node][ch] = len(children)
                    children.append({})
                    ids.append([])
                node = nxt
            ids[node].append(i)
        self.children = children
        self.ids = [tuple(x) for x in ids]
        self.n_nodes = len(children)

    def walk(self, step: Callable, accepting: Callable, state) -> tuple[list, list]:
        """(viable ids, complete ids) from matcher ``state`` (see the module docstring)."""
        viable: list = []
        complete: list = []
        if state is None:
            return viable, complete
        children, ids = self.children, self.ids
        todo = [(0, state)]
        pop, push = todo.pop, todo.append
        while todo:
            node, s = pop()
            here = ids[node]
            if here:
                viable.extend(here)
                if accepting(s):
                    complete.extend(here)
            for ch, child in children[node].items():
                s2 = step(s, ch)
                if s2 is not None:
                    push((child, s2))
        return viable, complete

    def mask(self, ids: list) -> torch.Tensor:
        """A bool tensor [V] with True at ``ids``."""
        t = torch.zeros(self.V, dtype=torch.bool)
        if ids:
            t[torch.tensor(ids, dtype=torch.long)] = True
        return t


def token_texts(lmv) -> list:
    """The text of every token id of a language-model value (the end-of-sequence token's
    is "")."""
    return [str(lmv.token(i)) for i in range(lmv.V)]


def vocab_trie_of(lmv) -> VocabTrie:
    """The vocabulary trie of a language-model value (``dsl.LMValue``), built once and
    kept on it; the end-of-sequence token is left out."""
    trie = getattr(lmv, "_vocab_trie", None)
    if trie is None or trie.V != lmv.V:
        eos = () if lmv.eos_id is None else (lmv.eos_id,)
        trie = VocabTrie(token_texts(lmv), skip=eos)
        lmv._vocab_trie = trie
    return trie
