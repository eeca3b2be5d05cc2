"""Constraints as potentials (issue 14 item 1): ``allowed=regex(...)``, ``allowed=grammar(...)``,
``allowed=json_schema(...)`` on ``lm.generate`` and ``lm.next_token``.

* The incremental matchers (``char_matcher``) agree with Lark's parser and with a brute
  force check of viable prefixes; the vocabulary trie's masks equal the token-by-token
  definition (a token is allowed iff the text with it appended is a viable prefix), also
  where a constraint's boundary falls inside a token.
* Exactly, on the toy LM by enumeration (rationals): ``generate(allowed=c)`` is the same
  measure (posterior and evidence) as ``generate()`` followed by ``condition
  c.accepts(text)``, for a regex, a grammar whose terminals end inside tokens, a JSON
  schema on a toy LM with JSON tokens (``'":'``, ``'1}'``, ``',"'``), with a stop string;
  ``next_token`` loops equal the condition "viable, and a sentence once ended".
* ``check_proper``: IS and SMC with a grammar constraint are proper, exactly.
* On the small trained LM: every completion parses under a regex, a grammar and a schema.
* Errors: bad grammars, regexes and schemas are located PPLRuntimeErrors with hints.
"""
import json
import math
import re
from fractions import Fraction

import pytest
import torch

import ppl
from ppl.semantics.errors import PPLError, PPLRuntimeError, ZeroEvidenceError
from ppl.stdlib.lm.char_matcher import GrammarMatcher, RegexMatcher
from ppl.stdlib.lm.constraints import grammar, json_schema, regex
from ppl.stdlib.lm.dsl import LMValue
from ppl.stdlib.lm.json_schema import schema_to_lark
from ppl.stdlib.lm.toy import EOS, START, ToyLM
from ppl.stdlib.lm.vocab_trie import VocabTrie
from ppl.testing.validity import check_proper, importance_algorithm, smc_algorithm

torch.set_num_threads(1)

LM = ToyLM()

#: a grammar whose terminals end inside tokens: " runs" is SP + VERB, " cats" is NOUN + PLURAL
WORDS_GRAMMAR = r'''
start: ART NOUN PLURAL? (SP VERB)?
ART: " the" | " a"
NOUN: " ca" "t" | " dog"
PLURAL: "s"
SP: " "
VERB: "runs" | "sees"
'''
WORDS_REGEX = r"( the| a)( cat| dog)s?( runs| sees)?"

#: a toy LM over JSON pieces; several tokens cross a JSON token boundary
JSON_TABLE = {
    START: {'{"a":': "1/2", '{"b":': "1/4", "{": "1/4"},
    '{"a":': {"1": "1/4", "12": "1/4", '"x"': "1/4", "1}": "1/4"},
    '{"b":': {"true": "1/2", '"x"': "1/2"},
    "{": {"}": "1/2", '"a":': "1/2"},
    '"a":': {"1": "1/2", "1}": "1/2"},
    "1": {"}": "1/2", ',"b":': "1/4", "2": "1/4"},
    "12": {"}": "1/2", ',"b":': "1/2"},
    "2": {"}": "1/2", EOS: "1/2"},
    '"x"': {"}": "1/2", ',"b":': "1/4", EOS: "1/4"},
    "true": {"}": "1/2", ',"a":': "1/2"},
    ',"a":': {"1}": "1"},
    ',"b":': {"true": "1/2", '"x"': "1/4", "false}": "1/4"},
    "1}": {EOS: "1/2", "}": "1/2"},
    "false}": {EOS: "1"},
    "}": {EOS: "3/4", "}": "1/4"},
}
JSON_LM = ToyLM(JSON_TABLE, name="json-toy")
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": ["string", "boolean"]}},
          "required": ["a"]}


def exact_measure(src, data) -> dict:
    res = ppl.model(src).run("enumerate", data)
    out: dict = {}
    for w, vals in res.paths:
        out[vals["return"]] = out.get(vals["return"], 0) + w
    return {k: v for k, v in out.items() if v}


def constrained_and_conditioned(gen_args: str, constraint: str, lm=LM):
    """The exact measures of generate(allowed=c) and of generate() + condition c.accepts."""
    a = exact_measure(f"""
def m(lm):
    c = {constraint}
    text ~ lm.generate({gen_args}, allowed=c)
    return text
""", {"lm": lm})
    b = exact_measure(f"""
def m(lm):
    c = {constraint}
    text ~ lm.generate({gen_args})
    condition c.accepts(text)
    return text
""", {"lm": lm})
    return a, b


# ------------------------------------------------------------------ matchers and masks
def test_regex_matcher_viable_prefixes_and_sentences():
    m = RegexMatcher(r"[0-9]+(\.[0-9]+)?")
    assert [m.viable(t) for t in ["", "1", "12.", "1.5", "a", "1.5.", "."]] == \
        [True, True, True, True, False, False, False]
    assert [m.accepts(t) for t in ["", "1", "12.", "1.5"]] == [False, True, False, True]
    assert RegexMatcher("a|b").viable("c") is False


def test_regex_matcher_agrees_with_python_re_ascii():
    """On random short texts (ASCII and not): accepts == re.fullmatch(pattern, text, re.ASCII)."""
    import random
    rnd = random.Random(0)
    alphabet = ["a", "b", "c", "x", "y", "1", "2", " ", "\n", "é", "A", "Z", ".", "-", "@", "_", "\t", "ß", "٣"]
    for p in [r"\w+", r"\d{2,3}", r"\s*x", r"[^a-c]+", r"(ab|a)*b?", r"a.c", r"(?i:abc)", r"x{0,2}y+",
              r"[\w.-]+@[\w-]+\.(com|org)", r"-?(0|[1-9][0-9]*)(\.[0-9]+)?", r"\S+ \S"]:
        m, r = RegexMatcher(p), re.compile(p, re.ASCII)
        for _ in range(300):
            s = "".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 6)))
            assert m.accepts(s) == bool(r.fullmatch(s)), (p, s)


def test_grammar_matcher_agrees_with_lark():
    from lark import Lark
    src = r'''
start: value
?value: NUMBER | "[" [value ("," value)*] "]" | ESCAPED_STRING
%import common.NUMBER
%import common.ESCAPED_STRING
%import common.WS
%ignore WS
'''
    g, lark = GrammarMatcher(src), Lark(src, parser="lalr")
    texts = ["", "[", "[1", "[1,", "[1, 2]", " [1 ,[2,3]] ", "[1,]", "]", "12", "1 2", '["a\\"b", 3]',
             '["a', "[1.5e3]", '"\\"', '"a"b"', "[[[]]]", "[[]"]
    for t in texts:
        try:
            lark.parse(t)
            want = True
        except Exception:
            want = False
        assert g.accepts(t) == want, t
        # a prefix is viable iff some text of the list that extends it parses (where one does)
        if want:
            assert all(g.viable(t[:k]) for k in range(len(t) + 1)), t
    assert not g.viable("[1,]") and not g.viable("]") and g.viable('["a')


def brute_force_mask(matcher, texts, prefix):
    """The definition: token i is allowed iff prefix + text_i is a viable prefix."""
    return ([i for i, t in enumerate(texts) if matcher.viable(prefix + t)],
            [i for i, t in enumerate(texts) if matcher.accepts(prefix + t)])


@pytest.mark.parametrize("matcher", [RegexMatcher(r"ab(cd|ce)*f"), GrammarMatcher(WORDS_GRAMMAR)],
                         ids=["regex", "grammar"])
def test_trie_masks_equal_the_token_by_token_definition(matcher):
    texts = ["a", "ab", "abc", "bcd", "cdc", "cef", "f", "fa", "b", "c", "d", "e", "ef", "abcdf",
             " the", " the c", " cat", "s", "s run", "s runs", " runs", " ru", "ns", " ", "t", " dog", "at"]
    trie = VocabTrie(texts)
    for prefix in ["", "a", "ab", "abc", "abce", " the", " the ca", " the cat", " the cats", " a dog r"]:
        s = matcher.advance(matcher.start, prefix)
        viable, complete = trie.walk(matcher.step, matcher.accepting, s)
        want_v, want_c = brute_force_mask(matcher, texts, prefix) if s is not None else ([], [])
        assert sorted(viable) == want_v, prefix
        assert sorted(complete) == want_c, prefix
    # a boundary inside a token: " the" + " c" keeps " the c" viable; "s run" crosses PLURAL|SP|VERB
    if isinstance(matcher, GrammarMatcher):
        s = matcher.advance(matcher.start, " the cat")
        viable, complete = trie.walk(matcher.step, matcher.accepting, s)
        assert texts.index("s run") in viable and texts.index("s runs") in complete
        assert texts.index(" runs") in complete and texts.index(" ru") in viable


def test_masks_are_cached_by_matcher_state():
    c = regex(r"( the| a)( cat| dog)s?")
    lmv = LMValue(ToyLM())
    bound = c.bind(lmv)
    assert c.bind(lmv) is bound
    the, a = lmv.ids_with_text(" the")[0], lmv.ids_with_text(" a")[0]
    bound.next_token_row((the,))
    n = len(bound._masks)
    bound.next_token_row((a,))  # " the" and " a" reach the same automaton state
    assert len(bound._masks) == n


# ------------------------------------------------------------------ exact: generate
def test_regex_constraint_equals_the_condition_exactly():
    a, b = constrained_and_conditioned('"", max_tokens=4', f"regex({json.dumps(WORDS_REGEX)})")
    assert a == b
    assert sum(a.values()) == Fraction(99, 256)
    # " the cat runs" + end: 1/2 * 1/2 * 1/4 * 3/4; " the cats runs" is cut at 4 tokens (no end term)
    assert a[" the cat runs"] == Fraction(3, 64) and a[" the cats runs"] == Fraction(1, 64)


def test_grammar_whose_terminals_end_inside_tokens_equals_the_condition():
    src = json.dumps(WORDS_GRAMMAR)
    a, b = constrained_and_conditioned('"", max_tokens=4', f"grammar({src})")
    assert a == b and sum(a.values()) == Fraction(99, 256)  # the same language as WORDS_REGEX
    # cut by max_tokens=3: a 3-token text must be whole ("the cat runs" fits, "the cats runs" not)
    a, b = constrained_and_conditioned('"", max_tokens=3', f"grammar({src})")
    assert a == b and " the cats runs" not in a and a[" the cat runs"] == Fraction(1, 16)  # cut: no end term


def test_constraint_with_a_stop_string_equals_the_condition():
    a, b = constrained_and_conditioned('"", max_tokens=5, stop=["s"]', f"regex({json.dumps(WORDS_REGEX)})")
    assert a == b and a  # a token completing "s" ends generation: allowed only if the text is whole


def test_json_schema_constraint_equals_the_condition_exactly():
    schema = json.dumps(json.dumps(SCHEMA))
    a, b = constrained_and_conditioned('"", max_tokens=5', f"json_schema({schema})", JSON_LM)
    assert a == b and len(a) > 5
    for text in a:
        v = json.loads(text)
        assert set(v) <= {"a", "b"} and isinstance(v["a"], int)
    # boundaries inside tokens: '{"a":' opens the object, writes a key and the colon; '1}' ends
    # a value and the object; '{"b":true,"a":1}' is an instance but not in the schema's order
    assert '{"a":1}' in a and '{"a":12,"b":"x"}' in a and '{"a":1,"b":false}' in a
    assert '{"b":true,"a":1}' not in a and '{}' not in a
    # '{"a":1}' + end: by '{"a":' '1}', by '{"a":' '1' '}', by '{' '"a":' '1}', by '{' '"a":' '1' '}'
    assert a['{"a":1}'] == Fraction(1, 16) + Fraction(3, 64) + Fraction(1, 32) + Fraction(3, 128)


def test_python_constraint_objects_as_data():
    model = ppl.model("""
def m(lm, c):
    text ~ lm.generate("", max_tokens=5, allowed=c)
    return text
""")
    res = model.run("enumerate", {"lm": JSON_LM, "c": json_schema(SCHEMA)})
    want, _ = constrained_and_conditioned('"", max_tokens=5', f"json_schema({json.dumps(json.dumps(SCHEMA))})",
                                          JSON_LM)
    got = {}
    for w, vals in res.paths:
        if w:
            got[vals["return"]] = got.get(vals["return"], 0) + w
    assert got == want


# ------------------------------------------------------------------ exact: next_token
def test_next_token_loop_equals_viable_and_whole_once_ended():
    a = exact_measure("""
def m(lm):
    toks = []
    for i in range(3):
        tok ~ lm.next_token(toks, allowed=regex(" the (cat|dog)s?"))
        toks = toks + [tok]
    return lm.decode(toks)
""", {"lm": LM})
    b = exact_measure("""
def m(lm):
    toks = []
    for i in range(3):
        tok ~ lm.next_token(toks)
        toks = toks + [tok]
    c = regex(" the (cat|dog)s?")
    text = lm.decode(toks)
    condition c.viable(text)
    if toks[2] == lm.eos:
        condition c.accepts(text)
    return text
""", {"lm": LM})
    assert a == b and sum(a.values()) == Fraction(3, 16)


def test_next_token_with_a_prompt_leaves_the_prompt_out():
    a = exact_measure("""
def m(lm):
    toks = [" the"]
    for i in range(2):
        tok ~ lm.next_token(toks, allowed=regex(" (cat|dog)s", prompt=" the"))
        toks = toks + [tok]
    return lm.decode(toks)
""", {"lm": LM})
    assert a == {" the cats": Fraction(1, 2) * Fraction(1, 4), " the dogs": Fraction(1, 4) * Fraction(1, 4)}
    with pytest.raises(PPLError, match="does not begin with the constraint's prompt") as err:
        exact_measure("""
def m(lm):
    tok ~ lm.next_token([" a"], allowed=regex(" cat", prompt=" the"))
    return tok
""", {"lm": LM})
    assert err.value.span.line == 3 and err.value.hint


def test_too_many_ways_to_split_is_a_located_error(monkeypatch):
    import ppl.stdlib.lm.char_matcher as cm
    monkeypatch.setattr(cm, "MAX_CONFIGURATIONS", 1)
    with pytest.raises(PPLRuntimeError, match="ways to split the text") as err:
        ppl.model("""
def m(lm):
    text ~ lm.generate("", max_tokens=2, allowed=grammar('start: W+\\nW: /[a-z ]+/'))
    return text
""").run("importance", {"lm": LM}, particles=4, seed=0)
    assert err.value.span.line == 3 and "delimiter" in err.value.hint


# ------------------------------------------------------------------ sampling
@pytest.mark.parametrize("algorithm", [importance_algorithm(2), smc_algorithm(2, "systematic")],
                         ids=["importance", "smc"])
def test_checker_accepts_constrained_programs_exactly(algorithm):
    src = f"""
def m(lm):
    first ~ lm.next_token([], allowed=grammar({json.dumps(WORDS_GRAMMAR)}))
    text ~ lm.generate([first], max_tokens=2, allowed=regex(" (cat|dog)s?( runs)?"))
    return first + text
"""
    c = check_proper(ppl.model(src), algorithm, {"lm": LM})
    assert c.ok, c


def test_smc_completions_all_parse_on_the_toy():
    model = ppl.model(f"""
def m(lm):
    text ~ lm.generate("", max_tokens=5, allowed=json_schema({json.dumps(json.dumps(SCHEMA))}))
    return text
""")
    res = model.run("smc", {"lm": JSON_LM}, particles=300, seed=0)
    marg = res.marginal()
    assert marg and all(json_valid(t) for t in marg)
    z = sum(constrained_and_conditioned('"", max_tokens=5', f"json_schema({json.dumps(json.dumps(SCHEMA))})",
                                        JSON_LM)[0].values())
    assert res.log_evidence == pytest.approx(math.log(z), abs=0.3)


def json_valid(text) -> bool:
    v = json.loads(text)
    return isinstance(v, dict) and isinstance(v.get("a"), int) and set(v) <= {"a", "b"} \
        and ("b" not in v or isinstance(v["b"], (str, bool)))


def test_a_constraint_no_path_can_satisfy_is_zero_evidence():
    src = """
def m(lm):
    text ~ lm.generate("", max_tokens=3, allowed=regex(" the zebra"))
    return text
"""
    for method in ("enumerate", "importance"):
        with pytest.raises(ZeroEvidenceError) as err:
            ppl.model(src).run(method, {"lm": LM}, particles=20, seed=0)
        assert err.value.span.line == 3


# ------------------------------------------------------------------ the small LM
@pytest.fixture(scope="module")
def small_lm():
    from ppl.stdlib.lm.small import stdlib_corpus, train
    return train(stdlib_corpus(max_chars=60_000), steps=40, seed=0, embed=16, hidden=64, seq_len=48, batch=16)


SMALL_GRAMMAR = r'''
start: "(" expr ")"
expr: NUMBER (OP NUMBER)*
OP: "+" | "-" | "*"
NUMBER: /[0-9]{1,2}/
'''


@pytest.mark.parametrize("constraint, valid", [
    ("regex(" + json.dumps(r"[A-Z][a-z]{1,6}( [a-z]{1,6}){1,2}\.") + ")", lambda t: re.fullmatch(r"[A-Z][a-z]{1,6}( [a-z]{1,6}){1,2}\.", t)),
    (f"grammar({json.dumps(SMALL_GRAMMAR)})", lambda t: re.fullmatch(r"\([0-9]{1,2}([-+*][0-9]{1,2})*\)", t)),
    ("json_schema('{\"type\": \"object\", \"properties\": {\"name\": {\"type\": \"string\", \"maxLength\": 6}, "
     "\"ok\": {\"type\": \"boolean\"}}, \"required\": [\"name\", \"ok\"]}')",
     lambda t: (lambda v: set(v) == {"name", "ok"} and len(v["name"]) <= 6 and isinstance(v["ok"], bool))(json.loads(t))),
], ids=["regex", "grammar", "json_schema"])
def test_small_lm_completions_all_parse(small_lm, constraint, valid):
    model = ppl.model(f"""
def m(lm):
    text ~ lm.generate("Return ", max_tokens=40, allowed={constraint})
    return text
""")
    res = model.run("smc", {"lm": small_lm}, particles=16, seed=0)
    texts = list(res.samples["return"])
    assert len(texts) == 16 and bool(torch.isfinite(res.log_weights).all())  # no particle died
    assert all(valid(t) for t in texts), texts  # 100% parse


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("stmt, message, hint", [
    ("c = grammar('start: a\\na: b')", "grammar", "Lark"),
    ("c = grammar('start: \"a\"\\n  | | ^')", "grammar", "Lark"),
    ("c = regex('(a')", "cannot be compiled", "regular expression"),
    ("c = regex('a(?=b)')", "look-around", "without"),
    ("c = regex(3)", "must be a string", None),
    ("c = json_schema('{\"type\": \"string\", \"pattern\": \"a+\"}')", "unsupported keyword 'pattern'", "supported"),
    ("c = json_schema('{\"type\": \"thing\"}')", "unknown type", "types are"),
    ("c = json_schema('{nope')", "not valid JSON", None),
    ("c = grammar('start: \"x\"', prompt=3)", "prompt= must be", None),
    ("c = regex('a')\n    y = c.acceptz('a')", "no attribute 'acceptz'", "accepts"),
])
def test_bad_constraints_are_located_errors(stmt, message, hint):
    src = f"def m(lm):\n    {stmt}\n    return 1\n"
    with pytest.raises(PPLRuntimeError, match=message) as err:
        ppl.model(src).run("enumerate", {"lm": LM})
    e = err.value
    assert e.span is not None and e.span.line >= 2
    assert "Traceback" not in str(e) and "lark." not in str(e)
    if hint:
        assert e.hint and hint in e.hint


def test_schema_to_lark_subset():
    g = GrammarMatcher(schema_to_lark({"type": "array", "items": {"enum": ["a", 1, None]}, "minItems": 1,
                                       "maxItems": 2}))
    assert [g.accepts(t) for t in ['["a"]', '[1,null]', '[]', '["a",1,1]', '["b"]']] == \
        [True, True, False, False, False]
    g = GrammarMatcher(schema_to_lark({"type": "number"}, whitespace=True))
    assert g.accepts("-1.5e3") and g.accepts(" 2 ") and not g.accepts("01") and not g.accepts("1.")
    g = GrammarMatcher(schema_to_lark({}))
    assert g.accepts('{"a":[1,{"b":null}],"c":"\\u00e9"}') and not g.accepts("{a:1}")
