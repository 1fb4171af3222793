"""Text generation with the KV cache: greedy, beam search and nucleus sampling, batched, in two semantics.

Every prompt is run through the model once (prefill, image features included); after that each step feeds one new
token per live row. Prompts of different lengths are left-padded: the model's KVCache counts only real tokens for
positions and masks pad keys, so a row gives the same tokens whatever else is in the batch.

Two semantics (docs/official_behaviour.md#official-decoding and #hf-port-differences):

* ``"official"`` (default) — the modified fairseq `SequenceGenerator` of the official demo and evaluation:
  - the length limit `max_length` (fairseq `max_len_b`, default 500) counts the prompt without `<s>` plus the
    generated tokens, and is capped at the model's `max_target_positions - 1`;
  - the no-repeat-ngram blocker (size 3) looks at the whole history: `<s>`, the prompt with its image slot ids 4…67,
    and the generated tokens;
  - for a prompt with an image, the first free token is exempt from the blocker and cannot *end* the hypothesis:
    fairseq clears its eos mask there, so an `</s>` picked at that step stays in the history as an ordinary token and
    generation goes on (text-only prompts have no such exemption, as in the official code);
  - beam scores include the log-probabilities of the forced prompt tokens and are normalised by the length of
    prompt + hypothesis (without `<s>`, with the final `</s>`); a sentence is done as soon as `num_beams` hypotheses
    ended (fairseq's rule).
* ``"hf"`` — transformers' `generate`: `max_new_tokens` (default 128), the blocker from the first generated token,
  `</s>` allowed at once, HF's beam scoring (generated tokens only, normalised by their count) and its default
  early-stopping heuristic.

The n-gram blocker keeps, per row, a dict from (n-1)-gram to the tokens that followed it and updates it with one entry
per step; the prompt's n-grams are built once and shared by all beams of a sentence.

Both references block n-grams of every token, grounding markup and location tokens included, so a caption cannot
ground two phrases that end in the same word ("a red circle" and "a yellow circle": the second `circle </phrase>
<object>` repeats a 3-gram). `ngram_exempt_ids` (the tokenizer's `grounding_markup_ids`, through
`Kosmos2.ground(..., block_markup_ngrams=False)`) leaves every n-gram that contains one of those ids unblocked; the
default keeps the official behaviour.

Deliberate difference from both references: pad tokens of left-padded rows are never part of a row's history (HF's
blocker would see them), which is what makes batched output equal to batch-size-1 output.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

import torch
import torch.nn.functional as F

from .model.kv_cache import KVCache

OFFICIAL, HF = "official", "hf"
SEMANTICS = (OFFICIAL, HF)
DEFAULT_MAX_LEN_B = 500  # run_gradio.sh --max-len-b 500 (prompt counted)
DEFAULT_HF_MAX_NEW_TOKENS = 128
NEG_INF = float("-inf")
HF_FINISHED_SCORE = -1.0e9  # transformers marks unusable beams with -1e9, not -inf (keeps arithmetic finite)


@dataclass
class GenerationConfig:
    semantics: str = OFFICIAL
    max_new_tokens: int | None = None   # generated tokens (eos not counted); both semantics honour it
    max_length: int | None = None       # official: prompt without <s> + generated; hf: all ids incl. <s>
    num_beams: int = 1
    do_sample: bool = False
    top_p: float = 1.0
    temperature: float = 1.0            # sampling only (greedy and beam search ignore it)
    seed: int | None = None
    no_repeat_ngram_size: int = 3
    ngram_exempt_ids: frozenset = frozenset()  # n-grams containing any of these ids are never blocked
    length_penalty: float = 1.0
    bos: int = 0
    pad: int = 1
    eos: int = 2

    def validate(self) -> "GenerationConfig":
        if self.semantics not in SEMANTICS:
            raise ValueError(f"semantics must be one of {SEMANTICS}, got {self.semantics!r}")
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.do_sample and self.num_beams > 1:
            raise ValueError("sampling with num_beams > 1 is not supported: use do_sample=True with num_beams=1, "
                             "or beam search without sampling")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.temperature > 0.0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        for name in ("max_new_tokens", "max_length"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.no_repeat_ngram_size < 0:
            raise ValueError(f"no_repeat_ngram_size must be >= 0, got {self.no_repeat_ngram_size}")
        return self


@dataclass
class Generated:
    tokens: list[int]     # generated ids after the prompt, without the final </s>
    score: float          # greedy/sampling: sum of log-probs of the chosen tokens; beams: the normalised beam score
    ended_with_eos: bool  # False when the length limit stopped it
    prompt_ids: list[int] = field(default_factory=list)  # the prompt it continues (<s> first)


# ----------------------------------------------------------------------------------------------------------------
# the no-repeat-ngram blocker


class NGramBlocker:
    """Per row: the tokens that would repeat an n-gram of the row's history.

    `prompt_ngrams[s]` maps each (n-1)-gram of prompt s to the tokens that followed it (built once, never mutated,
    shared by all beams of the sentence); `own[r]` holds row r's generated n-grams with immutable frozensets as values,
    so a beam that is selected twice needs only a shallow dict copy. n-grams containing an `exempt` id are not kept.
    """

    def __init__(self, n: int, histories: Sequence[Sequence[int]], exempt: frozenset = frozenset()):
        self.n = n
        self.exempt = frozenset(exempt)
        self.prompt_ngrams = [self._ngrams(h) for h in histories] if n > 0 else []
        self.sentence = list(range(len(histories)))
        self.own: list[dict] = [{} for _ in histories]
        self.tails = [tuple(h[-(n - 1):]) if n > 1 else () for h in histories]

    def _ngrams(self, tokens: Sequence[int]) -> dict:
        table: dict[tuple, set] = {}
        k = self.n - 1
        for i in range(len(tokens) - k):
            if self.exempt.isdisjoint(tokens[i:i + k + 1]):
                table.setdefault(tuple(tokens[i:i + k]), set()).add(tokens[i + k])
        return table

    def banned(self, row: int) -> set:
        if self.n == 0 or len(self.tails[row]) < self.n - 1:
            return set()
        key = self.tails[row]
        if not self.exempt.isdisjoint(key):
            return set()
        return self.prompt_ngrams[self.sentence[row]].get(key, set()) | self.own[row].get(key, frozenset())

    def ban(self, lprobs: torch.Tensor, rows: Sequence[int]) -> bool:
        """Set lprobs[r, t] = -inf for every banned t of each row r in `rows`; True if anything was banned."""
        if self.n == 0:
            return False
        row_idx, tok_idx = [], []
        for r in rows:
            banned = self.banned(r)
            row_idx.extend([r] * len(banned))
            tok_idx.extend(banned)
        if row_idx:
            lprobs[torch.tensor(row_idx, device=lprobs.device), torch.tensor(tok_idx, device=lprobs.device)] = NEG_INF
        return bool(row_idx)

    def push(self, tokens: Sequence[int]) -> None:
        """Append one token to every row."""
        if self.n == 0:
            return
        for r, tok in enumerate(tokens):
            tail = self.tails[r]
            if len(tail) == self.n - 1 and tok not in self.exempt and self.exempt.isdisjoint(tail):
                own = self.own[r]
                own[tail] = own.get(tail, frozenset()) | {tok}
            self.tails[r] = (tail + (tok,))[-(self.n - 1):] if self.n > 1 else ()

    def select(self, index: Sequence[int]) -> None:
        """Keep/reorder rows (finished rows dropped, beams reordered); a row picked twice gets its own dict copy."""
        seen, own = set(), []
        for i in index:
            own.append(dict(self.own[i]) if i in seen else self.own[i])
            seen.add(i)
        self.own = own
        self.sentence = [self.sentence[i] for i in index]
        self.tails = [self.tails[i] for i in index]


# ----------------------------------------------------------------------------------------------------------------
# batching


def left_pad(prompts: Sequence[Sequence[int]], image_masks: Sequence[Sequence[bool]] | None, pad: int,
             device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of different lengths -> [B, T] tokens padded on the left (so every row's next token goes in the same
    column) and the image-slot mask padded with False."""
    width = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.bool)
    for r, ids in enumerate(prompts):
        tokens[r, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        if image_masks is not None:
            mask[r, width - len(ids):] = torch.tensor(list(image_masks[r]), dtype=torch.bool)
    return tokens.to(device), mask.to(device)


def generation_budgets(config: GenerationConfig, prompt_lengths: Sequence[int], max_positions: int) -> list[int]:
    """Per row, how many tokens may be generated (not counting the final </s>)."""
    budgets = []
    for length in prompt_lengths:
        if config.semantics == OFFICIAL:
            # fairseq: max_len = min(max_len_b, max_positions - 1) tokens after <s>, the prompt included.
            max_len = min(config.max_length or DEFAULT_MAX_LEN_B, max_positions - 1)
            budget = max_len - (length - 1)
            if config.max_new_tokens is not None:
                budget = min(budget, config.max_new_tokens)
            limit = f"max_length={max_len} (official max_len_b, prompt counted)"
        else:
            budget = config.max_new_tokens if config.max_new_tokens is not None else DEFAULT_HF_MAX_NEW_TOKENS
            if config.max_length is not None:
                budget = min(budget, config.max_length - length)
            limit = f"max_length={config.max_length}"
        if budget < 1:
            raise ValueError(f"a prompt of {length} tokens leaves no room to generate under {limit}; "
                             "raise max_length or shorten the prompt")
        budgets.append(budget)
    return budgets


def _model_max_positions(model) -> int:
    return int(getattr(getattr(model, "cfg", None), "max_target_positions", 2048))


def _prefill(model, tokens, image_mask, image_features, capacity: int, full_logits: bool):
    """Run all prompts once, filling a fresh cache; returns (logits in fp32, cache)."""
    cache = KVCache.for_model(model, tokens.shape[0], capacity)
    has_images = image_features is not None and bool(image_mask.any())
    logits = model(tokens, image_features=image_features if has_images else None,
                   img_gpt_input_mask=image_mask if has_images else None, cache=cache, only_last=not full_logits)
    return logits.float(), cache


def _step(model, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
    return model(tokens[:, None], cache=cache, only_last=True)[:, -1].float()


def _first_free_rules(config: GenerationConfig, has_image: Sequence[bool], prompt_lengths: Sequence[int],
                      generated: int, rows: Sequence[int]):
    """(rows exempt from the blocker, rows whose eos does not end, rows where eos is banned) for this step."""
    if config.semantics != OFFICIAL or generated > 0:
        return set(), set(), set()
    # fairseq skips the blocker and clears the eos mask while step < len(src_tokens) in multimodal inference, i.e.
    # for the first free token; text-only inference has neither, but min_len=1 bans eos at step 0 (empty prompt).
    exempt = {i for i, r in enumerate(rows) if has_image[r]}
    no_eos = {i for i, r in enumerate(rows) if not has_image[r] and prompt_lengths[r] == 1}
    return exempt, exempt, no_eos


def _top_p_filter(lprobs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches top_p (at least one); others -inf."""
    if top_p >= 1.0:
        return lprobs
    sorted_lp, order = lprobs.sort(dim=-1, descending=True)
    cumulative = sorted_lp.exp().cumsum(dim=-1)
    # a token stays if the mass before it is below top_p (the first token always stays)
    remove = (cumulative - sorted_lp.exp()) >= top_p
    remove[:, 0] = False
    return lprobs.scatter(-1, order, sorted_lp.masked_fill(remove, NEG_INF))


# ----------------------------------------------------------------------------------------------------------------
# entry point


@torch.no_grad()
def generate(model, prompts: Sequence[Sequence[int]], image_masks: Sequence[Sequence[bool]] | None = None,
             image_features: torch.Tensor | None = None, config: GenerationConfig | None = None,
             stats: dict | None = None, **overrides) -> list[Generated]:
    """Generate a continuation for every prompt.

    prompts: token ids per row, starting with <s> (no padding; rows may differ in length).
    image_masks: per row, True on the image slots (None: text only).
    image_features: `model.encode_images(pixels)` of all images of all rows in row order ([N, Q, d]).
    stats: if a dict is given, it receives counters ('ngram_bans', 'model_calls', 'tokens_fed').
    """
    config = replace(config or GenerationConfig(), **overrides).validate()
    if len(prompts) == 0:
        return []
    for r, ids in enumerate(prompts):
        if len(ids) == 0 or ids[0] != config.bos:
            raise ValueError(f"prompt {r} must start with <s> (id {config.bos}); got {list(ids[:3])}...")
        if config.pad in ids:
            raise ValueError(f"prompt {r} contains the pad id {config.pad}; pass unpadded rows (padding is done here)")
    if image_masks is None:
        image_masks = [[False] * len(p) for p in prompts]
    has_image = [any(m) for m in image_masks]
    lengths = [len(p) for p in prompts]
    budgets = generation_budgets(config, lengths, _model_max_positions(model))
    stats = stats if stats is not None else {}
    stats.update(ngram_bans=0, model_calls=0, tokens_fed=0)
    device = next(model.parameters()).device
    tokens, mask = left_pad(prompts, image_masks, config.pad, device)
    if image_features is not None:
        image_features = image_features.to(device)
    search = _beam_search if config.num_beams > 1 else _greedy_or_sample
    results = search(model, prompts, tokens, mask, image_features, config, has_image, lengths, budgets, stats)
    for result, ids in zip(results, prompts):
        result.prompt_ids = list(ids)
    return results


def _greedy_or_sample(model, prompts, tokens, mask, image_features, config, has_image, lengths, budgets, stats):
    batch = len(prompts)
    logits, cache = _prefill(model, tokens, mask, image_features, tokens.shape[1] + max(budgets) + 1, False)
    logits = logits[:, -1]
    stats["model_calls"] += 1
    stats["tokens_fed"] += tokens.numel()
    generator = None
    if config.do_sample:
        generator = torch.Generator(device=logits.device)
        generator.manual_seed(config.seed if config.seed is not None else torch.seed())
    blocker = NGramBlocker(config.no_repeat_ngram_size, prompts, config.ngram_exempt_ids)
    rows = list(range(batch))  # original row of each live cache row
    results = [Generated([], 0.0, False) for _ in range(batch)]
    generated = 0
    while rows:
        scaled = logits / config.temperature if config.do_sample else logits
        lprobs = F.log_softmax(scaled, dim=-1)
        lprobs[:, config.pad] = NEG_INF
        exempt, eos_continues, no_eos = _first_free_rules(config, has_image, lengths, generated, rows)
        blocked_rows = [i for i in range(len(rows)) if i not in exempt]
        if blocker.ban(lprobs, blocked_rows):
            stats["ngram_bans"] += 1
        for i in no_eos:
            lprobs[i, config.eos] = NEG_INF
        if config.do_sample:
            choice_lp = lprobs.log_softmax(-1) if config.semantics == HF else lprobs  # HF renormalises before top-p
            probs = _top_p_filter(choice_lp, config.top_p).exp()
            next_tokens = torch.multinomial(probs, 1, generator=generator)[:, 0]
        else:
            next_tokens = lprobs.argmax(dim=-1)
        chosen_lp = lprobs.gather(1, next_tokens[:, None])[:, 0].tolist()
        next_list = next_tokens.tolist()
        generated += 1
        keep = []
        for i, (r, tok) in enumerate(zip(rows, next_list)):
            result = results[r]
            result.score += chosen_lp[i]
            if tok == config.eos and i not in eos_continues:
                result.ended_with_eos = True
                continue
            result.tokens.append(tok)
            if len(result.tokens) < budgets[r]:
                keep.append(i)
        if len(keep) == 0:
            break
        if len(keep) < len(rows):  # finished rows leave the batch: they cost nothing from here on
            index = torch.tensor(keep, device=next_tokens.device)
            cache.reorder(index)
            next_tokens = next_tokens.index_select(0, index)
            blocker.select(keep)
            blocker.push([next_list[i] for i in keep])
            rows = [rows[i] for i in keep]
        else:
            blocker.push(next_list)
        logits = _step(model, next_tokens, cache)
        stats["model_calls"] += 1
        stats["tokens_fed"] += len(rows)
    return results


# ----------------------------------------------------------------------------------------------------------------
# beam search


def _prompt_logprob(logits: torch.Tensor, tokens: torch.Tensor, pad: int) -> torch.Tensor:
    """Sum over each row of log p(prompt token | preceding prompt tokens), pads excluded ([B] fp32)."""
    lp = F.log_softmax(logits[:, :-1], dim=-1).gather(2, tokens[:, 1:, None])[..., 0]
    real = tokens[:, :-1].ne(pad) & tokens[:, 1:].ne(pad)  # a pad-preceded token is a row's <s>: not predicted
    return (lp * real).sum(dim=1)


@dataclass
class _Sentence:
    row: int                   # original prompt index
    budget: int
    prompt_len: int            # including <s>
    prompt_score: float        # official: log-prob of the forced prompt tokens (0 in hf semantics)
    finished: list             # (normalised score, tokens, ended_with_eos)
    done: bool = False


def _beam_search(model, prompts, tokens, mask, image_features, config, has_image, lengths, budgets, stats):
    k, official = config.num_beams, config.semantics == OFFICIAL
    logits, cache = _prefill(model, tokens, mask, image_features, tokens.shape[1] + max(budgets) + 1, official)
    stats["model_calls"] += 1
    stats["tokens_fed"] += tokens.numel()
    prompt_scores = _prompt_logprob(logits, tokens, config.pad).tolist() if official else [0.0] * len(prompts)
    logits = logits[:, -1]
    sentences = [_Sentence(r, budgets[r], lengths[r], prompt_scores[r], []) for r in range(len(prompts))]
    # every sentence starts with k identical beams of which only the first is live (the others score -1e9)
    expand = torch.arange(len(prompts), device=logits.device).repeat_interleave(k)
    cache.reorder(expand)
    logits = logits.index_select(0, expand)
    blocker = NGramBlocker(config.no_repeat_ngram_size, prompts, config.ngram_exempt_ids)
    blocker.select(expand.tolist())
    beam_scores = torch.full((len(prompts), k), HF_FINISHED_SCORE, device=logits.device)
    beam_scores[:, 0] = 0.0
    beam_tokens: list[list[int]] = [[] for _ in range(len(prompts) * k)]
    live = list(range(len(prompts)))  # sentence index of each live group of k rows
    generated = 0
    while live:
        lprobs = F.log_softmax(logits, dim=-1)
        vocab = lprobs.shape[-1]
        eos_unblocked = lprobs[:, config.eos].clone()
        lprobs[:, config.pad] = NEG_INF
        rows_per_beam = [sentences[s].row for s in live for _ in range(k)]
        exempt, eos_continues, no_eos = _first_free_rules(config, has_image, lengths, generated, rows_per_beam)
        if blocker.ban(lprobs, [i for i in range(len(rows_per_beam)) if i not in exempt]):
            stats["ngram_bans"] += 1
        for i in no_eos:
            lprobs[i, config.eos] = NEG_INF
        at_limit = [generated == sentences[s].budget for s in live]
        if official:
            for g, limit in enumerate(at_limit):  # fairseq: at max_len only </s> may follow
                if limit:  # (the blocker must not leave a beam without any way to end)
                    lprobs[g * k:(g + 1) * k] = NEG_INF
                    lprobs[g * k:(g + 1) * k, config.eos] = eos_unblocked[g * k:(g + 1) * k]
        total = (lprobs.view(len(live), k, vocab) + beam_scores[:, :, None]).view(len(live), k * vocab)
        cand_scores, cand_index = total.topk(2 * k, dim=1)
        cand_beam, cand_token = cand_index // vocab, cand_index % vocab
        cand_scores_l, cand_beam_l, cand_token_l = cand_scores.tolist(), cand_beam.tolist(), cand_token.tolist()
        new_rows, new_scores, new_tokens, still_live = [], [], [], []
        for g, s in enumerate(live):
            sent = sentences[s]
            hf_at_limit = not official and generated + 1 == sent.budget  # HF finalises every candidate at max length
            running = []
            for c in range(2 * k):
                score, beam, tok = cand_scores_l[g][c], cand_beam_l[g][c], cand_token_l[g][c]
                row = g * k + beam
                ends = (tok == config.eos and row not in eos_continues) or hf_at_limit
                if ends:
                    if c < k and score > HF_FINISHED_SCORE / 2 and score != NEG_INF:
                        hyp = beam_tokens[row] + ([] if tok == config.eos else [tok])
                        _finalise(sent, config, hyp, score, generated, tok == config.eos)
                elif len(running) < k:
                    running.append((row, score, tok))
            if official and at_limit[g]:
                sent.done = True
            elif not official:
                sent.done = hf_at_limit or _hf_cannot_improve(sent, config, running, generated + 1)
            elif len(sent.finished) >= k:
                sent.done = True
            if not sent.done:
                still_live.append(s)
                for row, score, tok in running:
                    new_rows.append(row)
                    new_scores.append(score)
                    new_tokens.append(tok)
        generated += 1
        if not still_live:
            break
        index = torch.tensor(new_rows, device=logits.device)
        cache.reorder(index)
        blocker.select(new_rows)
        blocker.push(new_tokens)
        beam_tokens = [beam_tokens[row] + [tok] for row, tok in zip(new_rows, new_tokens)]
        beam_scores = torch.tensor(new_scores, device=logits.device).view(len(still_live), k)
        live = still_live
        logits = _step(model, torch.tensor(new_tokens, device=logits.device), cache)
        stats["model_calls"] += 1
        stats["tokens_fed"] += len(new_tokens)
    results = []
    for sent in sentences:
        best = max(sent.finished, key=lambda f: f[0])  # stable: the earliest of equal scores, like a sort
        results.append(Generated(best[1], best[0], best[2]))
    return results


def _finalise(sent: _Sentence, config: GenerationConfig, hyp: list[int], score: float, generated: int,
              ended_with_eos: bool) -> None:
    """Record a finished hypothesis with its length-normalised score."""
    if config.semantics == OFFICIAL:
        # fairseq: score of prompt + hypothesis (incl. </s>) divided by that many tokens (<s> excluded)
        length = sent.prompt_len - 1 + generated + 1
        if len(sent.finished) < config.num_beams:
            sent.finished.append(((sent.prompt_score + score) / length ** config.length_penalty, hyp, ended_with_eos))
    else:
        # transformers: generated tokens only (the final </s> counted), keep the best num_beams
        normalised = score / (generated + 1) ** config.length_penalty
        sent.finished.append((normalised, hyp, ended_with_eos))
        sent.finished.sort(key=lambda f: -f[0])
        del sent.finished[config.num_beams:]


def _hf_cannot_improve(sent: _Sentence, config: GenerationConfig, running, generated_len: int) -> bool:
    """transformers' default early stop (early_stopping=False): done once num_beams hypotheses are finished and the
    best running beam, normalised by the current length, cannot beat the worst of them."""
    if len(sent.finished) < config.num_beams or not running:
        return len(running) == 0
    best_running = running[0][1] / generated_len ** config.length_penalty
    return not best_running > min(f[0] for f in sent.finished)


# ----------------------------------------------------------------------------------------------------------------
# scoring


@torch.no_grad()
def continuation_logprobs(model, prompts: Sequence[Sequence[int]], continuation_starts: Sequence[int],
                          image_masks: Sequence[Sequence[bool]] | None = None,
                          image_features: torch.Tensor | None = None, pad: int = 1) -> list[list[float]]:
    """Natural-log probability of every token from `continuation_starts[r]` on in row r, given all tokens before it
    (one forward pass; rows right-padded, which a causal model does not see)."""
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.bool)
    for r, ids in enumerate(prompts):
        tokens[r, :len(ids)] = torch.tensor(ids)
        if image_masks is not None:
            mask[r, :len(ids)] = torch.tensor(list(image_masks[r]), dtype=torch.bool)
    tokens, mask = tokens.to(device), mask.to(device)
    has_images = image_features is not None and bool(mask.any())
    logits = model(tokens, image_features=image_features.to(device) if has_images else None,
                   img_gpt_input_mask=mask if has_images else None).float()
    lp = F.log_softmax(logits[:, :-1], dim=-1).gather(2, tokens[:, 1:, None])[..., 0]
    out = []
    for r, ids in enumerate(prompts):
        start = continuation_starts[r]
        if not 1 <= start <= len(ids):
            raise ValueError(f"continuation start {start} outside 1..{len(ids)} for row {r}")
        out.append(lp[r, start - 1:len(ids) - 1].tolist())
    return out
