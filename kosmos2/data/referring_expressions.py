"""GRIT step 2: a noun chunk's referring expression, read off the dependency parse.

The expression of a chunk is the whole subtree of its root, `root.left_edge` .. `root.right_edge` (the paper:
recursively add the chunk's children). In "a dog in a field of flowers" the chunk "a dog" becomes the whole caption,
"a field" becomes "a field of flowers" and "flowers" stays "flowers" (copied: its subtree is the chunk).

* Coordination: a chunk whose root has conjuncts is not expanded (the paper's rule), since its subtree would
  swallow the other conjuncts ("a dog and a cat" as one expression for the dog's box). "Has conjuncts" is spaCy's
  `Token.conjuncts`, which lists the other members of the coordination for *every* member, so the later conjunct
  itself is not expanded either: in "a dog and a cat on a sofa" the parser hangs "on a sofa" under "cat", although
  it describes both as often as the cat alone. Such chunks are copied (`conjunct` in the builder's counts).
* Punctuation at the edges of the subtree is left out: when a caption is a bare noun phrase, the parser hangs the
  final period (and commas around a relative clause) under the noun, and an expression should not end in ".".
* The containment filter (keep only expressions not inside another) is not applied here: every grounded chunk gets
  its expression, and the loader's expression mode removes nested ones, as for the released GRIT.
"""
from __future__ import annotations


def expression_span(chunk) -> tuple[tuple[int, int], str]:
    """((start_char, end_char), how) for a spaCy noun chunk (`Span`); how is `expanded`, `copied` or `conjunct`."""
    root, doc = chunk.root, chunk.doc
    own = (chunk.start_char, chunk.end_char)
    if root.conjuncts:
        return own, "conjunct"
    first, last = root.left_edge.i, root.right_edge.i
    while last > first and doc[last].is_punct:
        last -= 1
    while first < last and doc[first].is_punct:
        first += 1
    start = min(doc[first].idx, chunk.start_char)
    end = max(doc[last].idx + len(doc[last].text), chunk.end_char)
    return ((start, end), "copied") if (start, end) == own else ((start, end), "expanded")
