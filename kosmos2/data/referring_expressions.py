"""GRIT step 2: a noun chunk's referring expression, read off the dependency parse.

The expression of a chunk is the whole subtree of its root, `root.left_edge` .. `root.right_edge` (the paper:
recursively add the chunk's children). In "a dog in a field of flowers" the chunk "a dog" becomes the whole caption,
"a field" becomes "a field of flowers" and "flowers" stays "flowers" (copied: its subtree is the chunk).

* Coordination: a chunk whose root has conjuncts is not expanded (the paper's rule), since its subtree would
  swallow the other conjuncts ("a dog and a cat" as one expression for the dog's box). "Has conjuncts" is spaCy's
  `Token.conjuncts`, which lists the other members of the coordination for *every* member, so the later conjunct
  itself is not expanded either: in "a dog and a cat on a sofa" the parser hangs "on a sofa" under "cat", although
  it describes both as often as the cat alone. Such chunks are copied (`conjunct` in the builder's counts).
* Lists: spaCy parses "a man, a woman and a dog" as "man" <-appos- "woman" <-conj- "dog", so "a man" has no
  conjuncts and its subtree is the whole list (one expression for the man's box). An appositive that has conjuncts
  of its own is a list continuing, not an appositive: its head is a list member and is not expanded either. A true
  appositive ("the statue, a gift from France") has no conjuncts and stays in the expression.
* Punctuation at the edges of the subtree is left out: when a caption is a bare noun phrase, the parser hangs the
  final period (and commas around a relative clause) under the noun, and an expression should not end in ".".
* The containment filter (keep only expressions not inside another) is not applied here: every grounded chunk gets
  its expression, and the loader's expression mode removes nested ones, as for the released GRIT.
"""
from __future__ import annotations


def heads_a_list(root) -> bool:
    """True when `root` is the first item of a comma list that the parser hung under it as an appositive."""
    return any(child.dep_ == "appos" and child.conjuncts for child in root.children)


def expression_span(chunk) -> tuple[tuple[int, int], str]:
    """((start_char, end_char), how) for a spaCy noun chunk (`Span`); how is `expanded`, `copied` or `conjunct`."""
    root, doc = chunk.root, chunk.doc
    own = (chunk.start_char, chunk.end_char)
    if root.conjuncts or heads_a_list(root):
        return own, "conjunct"
    first, last = root.left_edge.i, root.right_edge.i
    while last > first and doc[last].is_punct:
        last -= 1
    while first < last and doc[first].is_punct:
        first += 1
    start = min(doc[first].idx, chunk.start_char)
    end = max(doc[last].idx + len(doc[last].text), chunk.end_char)
    return ((start, end), "copied") if (start, end) == own else ((start, end), "expanded")
