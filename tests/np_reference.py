"""A float64 NumPy, one-token-at-a-time reference of LlamaGen GPT decoding with KV-cache policies.

Written from the specs (``spec/llamagen.md`` §2, §4, §5 and ``spec/adsa.md``), not from the JAX
code, so the tests can check that the two agree. Deliberately simple and slow:

- Every layer keeps the **full history** of post-RoPE keys and values of every row. A policy is
  explicit Python bookkeeping that says, per step, layer, row and head, which image tokens the
  query attends to. Attending over "the tokens the policy keeps" from the full history is the
  same computation as attending over a compacted cache, because a key carries its position.
- ``adsa-evict`` / ``adsa-evict-all`` / ``window`` / ``line`` / ``random`` / ``random-uniform`` /
  ``h2o`` keep a list of slots ``[prefix P | pool K | ring M + s - 1]`` of image indices per
  (layer, row, group); the condition slots come first, as in the spec. The slot contents are
  recorded in the JAX cache's ``pos`` format (absolute position ``c + index``, ``-1`` for empty,
  condition slots ``0 .. c-1``) so the slot identity can be compared exactly.
- ``h2o`` needs the attention probabilities: ``teacher_force`` hands every (layer, row, head)'s
  probabilities over the attended image tokens to a policy's ``observe`` after the attention.
- Scores are computed with the explicit pairwise sum ``score_i = sum_j v̂_i · v̂_j`` over the
  candidate set (``adsa-evict``) or the previous region (``adsa-select``), never with a running sum.
- Ties follow the spec: the first maximum is evicted, the lower token index is selected first.
  Bit-identical vectors get bit-identical scores here (the same elementwise expression for every
  candidate). Where *distinct* vectors score within ``NEAR`` of each other, float32 rounding in an
  implementation may order them either way: a ``resolver`` callback can then supply the
  implementation's choice, which is followed only if the rules allow it (else it is recorded in
  ``rejected`` and the strict rule applies).

Parameters: the tree produced by ``convert.gpt.convert_state_dict`` (layout at the top of
``adsa_jax/model.py``); they are cast to float64 here. Only NumPy is imported.
"""
from __future__ import annotations

import math

import numpy as np

EPS = 1e-6  # spec/adsa.md: v̂ = v / max(||v||, eps)
# Scores of *distinct* value vectors closer than this are decided by float32 rounding in the
# implementation (e.g. two different tokens whose mean cosines are equal by symmetry); the
# reference accepts either order there. Bit-identical vectors must always tie exactly.
NEAR = 5e-5


# ----------------------------------------------------------------------------- numerics (llamagen §2)


def _f64(tree):
    if isinstance(tree, dict):
        return {k: _f64(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_f64(v) for v in tree]
    return np.asarray(tree, dtype=np.float64)


def rms_norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def silu(x):
    return x / (1.0 + np.exp(-x))


def gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def rope_table(grid, head_dim, base, cls_token_num):
    """(c + g*g, d/2, 2) (cos, sin): zero rows for the condition positions, then the grid
    row-major; pair k < d/4 rotates by the row index, pair k >= d/4 by the column index, with
    frequencies base^(-2m/(d/2))."""
    half = head_dim // 2
    m = np.arange(half // 2, dtype=np.float64)
    freqs = base ** (-(2.0 * m) / half)
    table = np.zeros((cls_token_num + grid * grid, half, 2))
    for n in range(grid * grid):
        r, col = divmod(n, grid)
        ang = np.concatenate([r * freqs, col * freqs])
        table[cls_token_num + n, :, 0] = np.cos(ang)
        table[cls_token_num + n, :, 1] = np.sin(ang)
    return table


def apply_rope(x, rot):
    """x (..., D) with interleaved pairs (2k, 2k+1); rot (D/2, 2) broadcast over leading axes."""
    x0, x1 = x[..., 0::2], x[..., 1::2]
    cos, sin = rot[..., 0], rot[..., 1]
    out = np.empty_like(x)
    out[..., 0::2] = x0 * cos - x1 * sin
    out[..., 1::2] = x1 * cos + x0 * sin
    return out


def normalize(vecs):
    """Rows of vecs (n, X) divided by max(norm, eps)."""
    n = np.sqrt((vecs * vecs).sum(axis=-1, keepdims=True))
    return vecs / np.maximum(n, EPS)


def pairwise_scores(vecs):
    """score_i = sum_j v̂_i · v̂_j over the rows of vecs (n, X), explicitly (n x n products).

    The same elementwise expression for every (i, j): identical vectors get bit-identical scores."""
    vh = normalize(vecs)
    gram = (vh[:, None, :] * vh[None, :, :]).sum(axis=-1)  # (n, n)
    return gram.sum(axis=1)


def identity_classes(vecs):
    """Label per row of vecs: rows with bit-identical values share a label."""
    seen = {}
    return np.array([seen.setdefault(np.ascontiguousarray(x).tobytes(), len(seen)) for x in vecs])


def valid_selection(region, score, classes, K, chosen):
    """Whether `chosen` (image indices) is a K-lowest selection that float rounding could produce:
    every token clearly below the K-th lowest score is in, every token clearly above is out, and
    within each set of bit-identical vectors the lower indices are taken first. Returns None if
    valid, else the reason."""
    chosen = set(int(i) for i in chosen)
    region = np.asarray(region)
    if len(chosen) != K or not chosen <= set(region.tolist()):
        return f"{sorted(chosen)} is not {K} tokens of the region"
    kth = np.sort(score)[K - 1]
    inside = np.array([i in chosen for i in region.tolist()])
    if (~inside & (score < kth - NEAR)).any() or (inside & (score > kth + NEAR)).any():
        return "a clearly lower score left out or a clearly higher one taken"
    for cl in set(classes.tolist()):
        member = inside[classes == cl]  # the class in token order
        if member.any() and not member[: member.sum()].all():
            return f"identical vectors {region[classes == cl].tolist()} not taken lower index first"
    return None


def group_vectors(v_img, group, granularity):
    """v_img (n, H, D) -> the vectors one decision is based on: head g's (n, D), or all heads
    concatenated (n, H*D) for granularity 'layer'."""
    if granularity == "head":
        return v_img[:, group, :]
    return v_img.reshape(v_img.shape[0], -1)


# ----------------------------------------------------------------------------- policies (spec/adsa.md)


class DenseRef:
    name = "dense"
    granularity = "head"

    def start(self, n_layer, rows, n_head):
        self.n_head = n_head

    def groups(self):
        return 1

    def step(self, layer, row, k, v_img):
        """Image token k was just written; v_img (k+1, H, D). Returns per head the attended image
        indices (sorted int arrays)."""
        return [np.arange(k + 1)] * self.n_head


class SelectRef:
    """adsa-select: prefix 0..P-1, local k-M+1..k, and from the previous region P..k-M the K
    lowest scores (ties: lower index first), or the whole region if it has <= K tokens.

    resolver(k, layer, row, group, region) -> the K image indices an implementation selected, or
    None. Used only to follow an implementation through decisions that float rounding may
    legitimately decide either way (see ``valid_selection``); invalid answers are recorded in
    ``rejected`` and the strict rule is applied instead."""

    name = "adsa-select"

    def __init__(self, P, K, M, granularity="head", resolver=None):
        self.P, self.K, self.M, self.granularity = P, K, M, granularity
        self.resolver = resolver

    def start(self, n_layer, rows, n_head):
        self.n_head = n_head
        self.last_selected = {}  # (layer, row, group) -> sorted image indices selected at this step
        self.cut_ties = {}  # (k, layer, row, group) -> tokens with exactly the K-th lowest score
        self.ambiguous = {}  # (k, layer, row, group) -> tokens near the cut from distinct V
        self.rejected = {}  # (k, layer, row, group) -> (resolver's answer, why it breaks the rules)
        self.decisions = 0

    def groups(self):
        return self.n_head if self.granularity == "head" else 1

    def _select(self, k, layer, row, g, region, v_img):
        K = self.K
        vecs = group_vectors(v_img[region], g, self.granularity)
        score = pairwise_scores(vecs)
        self.decisions += 1
        order = np.lexsort((region, score))  # by score, then by token index
        sel = np.sort(region[order[:K]])
        if K == 0:
            return sel
        kth = score[order[K - 1]]
        if score[order[K]] == kth:  # the cut falls inside a run of equal scores
            self.cut_ties[(k, layer, row, g)] = region[score == kth].tolist()
        band = np.abs(score - kth) <= NEAR
        if len(set(identity_classes(vecs)[band].tolist())) > 1:
            self.ambiguous[(k, layer, row, g)] = region[band].tolist()
        if self.resolver is not None:
            got = self.resolver(k, layer, row, g, region.tolist())
            if got is not None:
                why = valid_selection(region, score, identity_classes(vecs), K, got)
                if why is None:
                    return np.sort(np.asarray(got, np.int64))
                self.rejected[(k, layer, row, g)] = (sorted(got), why)
        return sel

    def step(self, layer, row, k, v_img):
        P, K, M = self.P, self.K, self.M
        prefix = set(range(min(P, k + 1)))
        local = set(range(max(0, k - M + 1), k + 1))
        region = np.arange(P, k - M + 1)  # may be empty
        out = []
        for g in range(self.groups()):
            sel = region if len(region) <= K else self._select(k, layer, row, g, region, v_img)
            self.last_selected[(layer, row, g)] = sel
            out.append(np.array(sorted(prefix | set(sel.tolist()) | local), dtype=np.int64))
        if self.granularity == "layer":
            out = out * self.n_head
        return out


class EvictRef:
    """adsa-evict (and, with K = 0, window): slots [prefix P | pool K | ring M + s - 1] per group.

    Period s (spec/adsa.md): at s = 1 the ring has M slots and the token leaving it (o) enters
    the pool or competes with it, every step. At s > 1 the ring has M + s - 1 slots, and every
    s steps (from the step whose ring slot holds the oldest ring token on) the s oldest ring
    tokens leave together: with the filled pool slots they form the candidates (pool in slot
    order, then the leaving tokens oldest first); if there are more than K, the n = (count - K)
    highest scores over that candidate set are dropped (equal scores: lower candidate index
    first); the leaving tokens that stay fill the free and freed pool slots, ascending, oldest
    first. At s = 1 this is the rule above (one leaving token, n = 1).

    chooser(k, layer, row, group, cands, scores) -> index into cands of the token to evict,
    replacing the spec's rule (used to replay the random policies' draws); at s > 1 it is called
    with a seventh argument n and returns the n indices to drop.
    resolver(k, layer, row, group, cands) -> index into cands an implementation evicted (at
    s > 1: the list of indices it dropped), or None: followed only where float rounding may
    legitimately decide (distinct V vectors whose scores are within NEAR of the maximum);
    identical vectors must still follow the first-maximum rule. Answers that break the rule are
    recorded in ``rejected`` and the rule is applied instead."""

    def __init__(self, P, K, M, granularity="head", chooser=None, name="adsa-evict", resolver=None, period=1):
        self.P, self.K, self.M, self.granularity = P, K, M, granularity
        self.chooser = chooser
        self.resolver = resolver
        self.name = name
        self.period = period

    def start(self, n_layer, rows, n_head):
        self.n_head = n_head
        G = self.groups()
        ring = self.M + self.period - 1
        self.state = [[[{"prefix": [-1] * self.P, "pool": [-1] * self.K, "ring": [-1] * ring}
                        for _ in range(G)] for _ in range(rows)] for _ in range(n_layer)]
        self.decisions = 0  # evictions decided by a score (pool full)
        self.tied_max = 0  # ... of which the maximum score was shared by several candidates
        self.ties = {}  # (k, layer, row, group) -> candidates sharing the maximum exactly
        self.ambiguous = {}  # (k, layer, row, group) -> acceptable victims (distinct V within NEAR of the max)
        self.rejected = {}  # (k, layer, row, group) -> (resolver's victim, acceptable victims)

    def groups(self):
        return self.n_head if self.granularity == "head" else 1

    def _evict(self, k, layer, row, g, cands, v_img):
        vecs = group_vectors(v_img[np.asarray(cands)], g, self.granularity)
        scores = pairwise_scores(vecs)
        self.decisions += 1
        top = scores.max()
        strict = int(np.flatnonzero(scores == top)[0])  # first maximum in candidate order
        if np.sum(scores == top) > 1:
            self.tied_max += 1
            self.ties[(k, layer, row, g)] = [cands[i] for i in np.flatnonzero(scores == top)]
        if self.chooser is not None:
            return int(self.chooser(k, layer, row, g, list(cands), scores))
        # acceptable victims: the first candidate of every identity class whose score is within
        # NEAR of the maximum (identical vectors score identically, so only their first may go)
        cls = identity_classes(vecs)
        acceptable = sorted({int(np.flatnonzero(cls == cl)[0]) for cl in cls[scores >= top - NEAR]})
        return self._settle(k, layer, row, g, cands, acceptable, strict)

    def _settle(self, k, layer, row, g, cands, acceptable, strict):
        """The victim: ``strict``, or the resolver's pick when it is one of the ``acceptable``
        near-ties (recorded as ambiguous); a pick outside them is recorded as rejected."""
        if len(acceptable) > 1:
            self.ambiguous[(k, layer, row, g)] = [cands[i] for i in acceptable]
        if self.resolver is not None:
            got = self.resolver(k, layer, row, g, list(cands))
            if got is not None:
                if got in acceptable:
                    return int(got)
                self.rejected[(k, layer, row, g)] = (cands[got], [cands[i] for i in acceptable])
        return strict

    def _drop(self, k, layer, row, g, cands, n, v_img):
        """Period s > 1: the n candidates to drop (indices into cands), the n highest scores."""
        vecs = group_vectors(v_img[np.asarray(cands)], g, self.granularity)
        scores = pairwise_scores(vecs)
        self.decisions += 1
        idx = np.arange(len(cands))
        strict = sorted(np.lexsort((idx, -scores))[:n].tolist())  # highest first, lower index first
        cut = np.sort(scores)[::-1][n - 1]
        if n < len(cands) and np.sum(scores == cut) > 1 and np.sort(scores)[::-1][n] == cut:
            self.tied_max += 1
            self.ties[(k, layer, row, g)] = [cands[i] for i in np.flatnonzero(scores == cut)]
        if self.chooser is not None:
            return sorted(int(i) for i in self.chooser(k, layer, row, g, list(cands), scores, n))
        cls = identity_classes(vecs)
        band = np.abs(scores - cut) <= NEAR
        if len(set(cls[band].tolist())) > 1:
            self.ambiguous[(k, layer, row, g)] = [cands[i] for i in np.flatnonzero(band)]
        if self.resolver is not None:
            got = self.resolver(k, layer, row, g, list(cands))
            if got is not None:
                why = valid_selection(idx, -scores, cls, n, got)
                if why is None:
                    return sorted(int(i) for i in got)
                self.rejected[(k, layer, row, g)] = ([cands[i] for i in got], why)
        return strict

    def _leave(self, k, layer, row, g, st, leaving, v_img):
        """The tokens `leaving` (oldest first) leave the ring: into the pool, or dropped."""
        K = self.K
        pool = st["pool"]
        if K == 0:
            return  # no pool: they are dropped
        free = [i for i in range(K) if pool[i] < 0]
        if len(free) >= len(leaving):
            for slot, o in zip(free, leaving):
                pool[slot] = o
            return
        if self.period == 1:  # the pool is full: candidates pool + o, the first maximum is evicted
            (o,) = leaving
            cands = pool + [o]
            victim = self._evict(k, layer, row, g, cands, v_img)
            if not 0 <= victim <= K:
                raise ValueError(f"victim {victim} not in 0..{K}")
            if victim < K:
                pool[victim] = o  # the evicted pool token is dropped
            return  # victim == K: o itself is dropped
        filled = [i for i in range(K) if pool[i] >= 0]
        cands = [pool[i] for i in filled] + list(leaving)
        n = len(cands) - K
        drop = self._drop(k, layer, row, g, cands, n, v_img)
        if len(drop) != n or not all(0 <= d < len(cands) for d in drop):
            raise ValueError(f"dropped {drop}: not {n} of the {len(cands)} candidates")
        freed = sorted(free + [filled[d] for d in drop if d < len(filled)])
        stay = [cands[m] for m in range(len(filled), len(cands)) if m not in drop]
        assert len(stay) == len(freed)
        for slot, o in zip(freed, stay):
            pool[slot] = o

    def step(self, layer, row, k, v_img):
        P, s = self.P, self.period
        R = self.M + s - 1  # ring slots
        out = []
        for g in range(self.groups()):
            st = self.state[layer][row][g]
            if k < P:
                st["prefix"][k] = k
            else:
                j = k - P
                if j >= R and (j - R) % s == 0:  # the s oldest ring tokens leave, oldest first
                    slots = [(j + i) % R for i in range(s)]
                    self._leave(k, layer, row, g, st, [st["ring"][r] for r in slots], v_img)
                    for r in slots:
                        st["ring"][r] = -1
                st["ring"][j % R] = k
            kept = [i for i in st["prefix"] + st["pool"] + st["ring"] if i >= 0]
            out.append(np.array(sorted(kept), dtype=np.int64))
        if self.granularity == "layer":
            out = out * self.n_head
        return out

    def slots(self, layer, c):
        """(rows, G, c + P + K + M) int array in the JAX cache's ``pos`` format."""
        rows = []
        for per_row in self.state[layer]:
            grp = []
            for st in per_row:
                img = st["prefix"] + st["pool"] + st["ring"]
                grp.append(list(range(c)) + [c + i if i >= 0 else -1 for i in img])
            rows.append(grp)
        return np.array(rows, dtype=np.int64)


class H2ORef(EvictRef):
    """h2o (spec/kv-baselines.md): the evict layout [prefix P | pool K | ring M]; each image token
    accumulates the attention probability it receives from every query (per layer, row and head,
    via ``observe``); when the pool is full the candidate (pool in slot order, then o) with the
    lowest sum is evicted (first minimum), per head, or on the sum over heads (granularity
    'layer'). The eviction at token k uses the sums of the queries of tokens 0..k-1.

    resolver: as EvictRef's; followed only among candidates within NEAR of the minimum."""

    def __init__(self, P, K, M, granularity="head", resolver=None):
        super().__init__(P, K, M, granularity, name="h2o", resolver=resolver)

    def start(self, n_layer, rows, n_head):
        super().start(n_layer, rows, n_head)
        self.acc = {}  # (layer, row, head, image index) -> accumulated attention probability

    def observe(self, layer, row, head, idx, probs):
        for i, pr in zip(idx, probs):
            key = (layer, row, head, int(i))
            self.acc[key] = self.acc.get(key, 0.0) + float(pr)

    def _evict(self, k, layer, row, g, cands, v_img):
        heads = [g] if self.granularity == "head" else range(self.n_head)
        acc = np.array([sum(self.acc.get((layer, row, h, int(i)), 0.0) for h in heads) for i in cands])
        self.decisions += 1
        low = acc.min()
        strict = int(np.flatnonzero(acc == low)[0])  # first minimum in candidate order
        if np.sum(acc == low) > 1:
            self.tied_max += 1
            self.ties[(k, layer, row, g)] = [cands[i] for i in np.flatnonzero(acc == low)]
        acceptable = np.flatnonzero(acc <= low + NEAR).tolist()
        return self._settle(k, layer, row, g, cands, acceptable, strict)


def window_ref(P, K, M, granularity="head"):
    """window = sinks (condition + prefix P) + FIFO ring of the last K + M tokens, no pool."""
    return EvictRef(P, 0, K + M, granularity=granularity, name="window")


def line_sizes(grid, budget, anchors=None):
    """line (LineAR-style): P = anchors (default one row) and a ring of r whole rows,
    r = floor((T - P) / w), T = round(b N)."""
    total = round(budget * grid * grid)
    P = grid if anchors is None else anchors
    return P, 0, (total - P) // grid * grid


def make_ref_policy(name, P=0, K=0, M=1, granularity="head", chooser=None, resolver=None, period=1):
    """P, K, M: the policy's own sizes (adsa-evict-all: P = 0, M = 1; line: the ring in M)."""
    if name == "dense":
        return DenseRef()
    if name == "adsa-select":
        return SelectRef(P, K, M, granularity, resolver=resolver)
    if name in ("adsa-evict", "adsa-evict-all"):
        if name == "adsa-evict-all" and (P, M) != (0, 1):
            raise ValueError("adsa-evict-all has P = 0 and M = 1")
        return EvictRef(P, K, M, granularity, resolver=resolver, name=name, period=period)
    if name in ("window", "line"):
        ref = window_ref(P, K, M, granularity)
        ref.name = name
        return ref
    if name in ("random", "random-uniform"):
        if chooser is None:
            raise ValueError(f"the {name} policy needs a chooser (the victims are random)")
        return EvictRef(P, K, M, granularity, chooser=chooser, name=name, period=period)
    if name == "h2o":
        return H2ORef(P, K, M, granularity, resolver=resolver)
    raise ValueError(name)


def policy_sizes(name, grid, budget=None, prefix=None, keep=None, local=None):
    """P, K, M of a policy from a budget fraction (spec/adsa.md defaults; adsa-evict-all: P = 0,
    M = 1, K = T - 1; line: P = one row, a ring of whole rows; h2o: P = 0, M = two rows,
    K = T - M) or from explicit sizes (adsa-evict-all: keep only; line: prefix and local)."""
    if budget is None:
        if name == "adsa-evict-all":
            return 0, keep, 1
        if name == "line":
            return prefix, 0, local
        return prefix, keep, local
    total = round(budget * grid * grid)
    if name == "adsa-evict-all":
        return 0, total - 1, 1
    if name == "line":
        return line_sizes(grid, budget, prefix)
    if name == "h2o":
        return 0, total - 2 * grid, 2 * grid
    return default_sizes(grid, budget)


def default_sizes(grid, budget):
    """spec/adsa.md: T = round(b N), P = w, M = 2w, K = T - P - M."""
    total = round(budget * grid * grid)
    P, M = grid, 2 * grid
    K = total - P - M
    if K < 0:
        raise ValueError("budget too small for the default sizes")
    return P, K, M


# ----------------------------------------------------------------------------- the model


class RefModel:
    """cfg: anything with dim, n_layer, n_head, norm_eps, rope_base, cls_token_num, block_size,
    vocab_size, model_type, num_classes (the fields of LlamaGen's ModelArgs)."""

    def __init__(self, params, cfg):
        self.p = _f64(params)
        self.cfg = cfg
        self.c = cfg.cls_token_num
        self.H = cfg.n_head
        self.D = cfg.dim // cfg.n_head
        self.grid = math.isqrt(cfg.block_size)
        self.N = cfg.block_size
        self.rope = rope_table(self.grid, self.D, float(cfg.rope_base), self.c)

    # -- condition rows (llamagen §2.1, §5.1, §7; rows interleaved [cond_0, uncond_0, cond_1, ...])

    def condition_rows(self, cond, cond_mask=None, use_cfg=False):
        """Returns (emb (R, c, E), mask (R, c) bool)."""
        cfg = self.cfg
        if cfg.model_type == "c2i":
            ids = np.asarray(cond, np.int64)
            mask = np.ones((len(ids), 1), bool)
            if use_cfg:
                ids = np.stack([ids, np.full_like(ids, cfg.num_classes)], axis=1).reshape(-1)
                mask = np.repeat(mask, 2, axis=0)
            return self.p["cls_embedding"][ids][:, None, :], mask
        mask = np.asarray(cond_mask).astype(bool)
        feats = np.asarray(cond, np.float64) * mask[..., None]  # padded caption rows are zero
        if use_cfg:
            null = np.broadcast_to(self.p["caption"]["uncond"], feats.shape)  # not masked
            feats = np.stack([feats, null], axis=1).reshape((-1,) + feats.shape[1:])
            mask = np.repeat(mask, 2, axis=0)  # the null caption keeps the prompt's mask
        cap = self.p["caption"]
        emb = gelu_tanh(feats @ cap["fc1"]) @ cap["fc2"]
        return emb[:, : self.c], mask

    # -- pieces

    def _qkv(self, layer, x):
        """x (..., E) -> q, k, v each (..., H, D)."""
        qkv = np.einsum("...e,eshd->s...hd", x, layer["wqkv"])
        return qkv[0], qkv[1], qkv[2]

    def _ffn(self, layer, x):
        h = rms_norm(x, layer["ffn_norm"], self.cfg.norm_eps)
        return (silu(h @ layer["w1"]) * (h @ layer["w3"])) @ layer["w2"]

    def _head(self, x):
        return rms_norm(x, self.p["norm"], self.cfg.norm_eps) @ self.p["output"]

    # -- prefill (llamagen §4.2, §4.4)

    def prefill(self, emb, mask):
        """emb (R, c, E), mask (R, c). Returns logits of the last condition position (R, V)
        and the per-layer condition keys/values [(K (R, c, H, D), V (R, c, H, D))]."""
        R, c, _ = emb.shape
        x = emb.copy()
        i = np.arange(c)[:, None]
        j = np.arange(c)[None, :]
        allowed = ((j <= i)[None] & mask[:, None, :]) | (i == j)[None]  # (R, c, c)
        kv = []
        scale = 1.0 / math.sqrt(self.D)
        for layer in self.p["layers"]:
            h = rms_norm(x, layer["attention_norm"], self.cfg.norm_eps)
            q, k, v = self._qkv(layer, h)  # (R, c, H, D)
            rot = self.rope[:c][None, :, None]  # (1, c, 1, D/2, 2): all zeros
            q, k = apply_rope(q, rot), apply_rope(k, rot)
            kv.append((k, v))
            o = np.zeros_like(q)
            for r in range(R):
                for hh in range(self.H):
                    for a in range(c):
                        cols = np.flatnonzero(allowed[r, a])
                        w = softmax(k[r, cols, hh] @ q[r, a, hh] * scale)
                        o[r, a, hh] = w @ v[r, cols, hh]
            x = x + np.einsum("rchd,hde->rce", o, layer["wo"])
            x = x + self._ffn(layer, x)
        return self._head(x[:, -1]), kv

    # -- teacher-forced decode

    def teacher_force(self, policy, cond, tokens, cond_mask=None, cfg_scale=1.0, record=True):
        """Prefill, then feed image tokens 0..N-2 (tokens (B, N-1) or (B, N)) one at a time.

        Returns a dict:
          logits_rows (R, N, V): raw logits of every row (row j predicts image token j);
          logits (B, N, V): guided (uncond + (cond - uncond) * s) when cfg_scale > 1, else raw;
          attended[k][l]: (R, H) nested lists of sorted image indices attended at token k;
          selected[k][l]: (R, G) lists of indices chosen from the previous region (select);
          slots[k][l]: (R, G, C) int array, pos format (evict/window/random).
        """
        use_cfg = cfg_scale > 1.0
        emb, mask = self.condition_rows(cond, cond_mask, use_cfg)
        R = emb.shape[0]
        tokens = np.asarray(tokens, np.int64)[:, : self.N - 1]
        B = tokens.shape[0]
        fed = np.repeat(tokens, 2, axis=0) if use_cfg else tokens
        assert fed.shape[0] == R
        L, H, D, c, N = self.cfg.n_layer, self.H, self.D, self.c, self.N
        policy.start(L, R, H)
        logits0, cond_kv = self.prefill(emb, mask)
        k_img = np.zeros((L, R, N, H, D))
        v_img = np.zeros((L, R, N, H, D))
        logits = [logits0]
        attended, selected, slots = [], [], []
        scale = 1.0 / math.sqrt(D)
        for kk in range(tokens.shape[1]):
            x = self.p["tok_embeddings"][fed[:, kk]]  # (R, E)
            rot = self.rope[c + kk]
            att_k, sel_k, slot_k = [], [], []
            for li, layer in enumerate(self.p["layers"]):
                h = rms_norm(x, layer["attention_norm"], self.cfg.norm_eps)
                q, k, v = self._qkv(layer, h)  # (R, H, D)
                q, k = apply_rope(q, rot), apply_rope(k, rot)
                k_img[li, :, kk], v_img[li, :, kk] = k, v  # written before the attention
                kc, vc = cond_kv[li]
                o = np.zeros((R, H, D))
                att_l = []
                for r in range(R):
                    sets = policy.step(li, r, kk, v_img[li, r, : kk + 1])
                    att_l.append([s.tolist() for s in sets] if record else None)
                    ccols = np.flatnonzero(mask[r])  # padded caption columns are hidden
                    for hh in range(H):
                        idx = sets[hh]
                        keys = np.concatenate([kc[r, ccols, hh], k_img[li, r, idx, hh]])
                        vals = np.concatenate([vc[r, ccols, hh], v_img[li, r, idx, hh]])
                        w = softmax(keys @ q[r, hh] * scale)
                        o[r, hh] = w @ vals
                        if hasattr(policy, "observe"):  # h2o accumulates the image tokens' probabilities
                            policy.observe(li, r, hh, idx, w[len(ccols):])
                x = x + np.einsum("rhd,hde->re", o, layer["wo"])
                x = x + self._ffn(layer, x)
                if record:
                    att_k.append(att_l)
                    if isinstance(policy, SelectRef):
                        sel_k.append([[policy.last_selected[(li, r, g)].tolist() for g in range(policy.groups())]
                                      for r in range(R)])
                    if isinstance(policy, EvictRef):
                        slot_k.append(policy.slots(li, c))
            logits.append(self._head(x))
            attended.append(att_k)
            selected.append(sel_k)
            slots.append(slot_k)
        rows = np.stack(logits, axis=1)  # (R, N, V)
        if use_cfg:
            cond_l, uncond_l = rows[0::2], rows[1::2]
            guided = uncond_l + (cond_l - uncond_l) * cfg_scale
        else:
            guided = rows
        assert guided.shape[0] == B
        return {"logits_rows": rows, "logits": guided, "attended": attended, "selected": selected,
                "slots": slots, "policy": policy}
