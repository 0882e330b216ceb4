"""The notebooks' diagrams, drawn with matplotlib: boxes, arrows and the residual stream. Each function draws one
picture from the numbers it is given (a config, a file header, router probabilities), so the pictures stay true
to the code."""

import math

import matplotlib.pyplot as plt
from matplotlib.patches import Circle, FancyArrowPatch, FancyBboxPatch, Rectangle

COLORS = {"attn": "#f4c27a", "mlp": "#9fd0a8", "norm": "#c9b8e8", "embed": "#a9cbe8", "state": "#f2a7a7",
          "plain": "#e8e8e8"}


def _canvas(width, height, title=None):
    fig, ax = plt.subplots(figsize=(width, height))
    ax.set_xlim(0, width); ax.set_ylim(0, height); ax.axis("off")
    if title:
        ax.set_title(title)
    return fig, ax


def _box(ax, x, y, w, h, text, kind="plain", size=9):
    """A rounded box centred on (x, y)."""
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.02,rounding_size=0.08",
                                fc=COLORS[kind], ec="black", lw=0.8))
    ax.text(x, y, text, ha="center", va="center", fontsize=size)


def _arrow(ax, a, b, **kw):
    ax.add_patch(FancyArrowPatch(a, b, arrowstyle="-|>", mutation_scale=10, lw=1, color="black",
                                 shrinkA=0, shrinkB=0, **kw))


def _plus(ax, x, y):
    ax.add_patch(Circle((x, y), 0.14, fc="white", ec="black", lw=1))
    ax.text(x, y, "+", ha="center", va="center", fontsize=10)


def model_diagram(config, batch=1, tokens=6):
    """nb1: the whole model, bottom to top, with the shape of what flows between the parts."""
    B, T, d, V, L = batch, tokens, config.hidden_size, config.vocab_size, config.num_hidden_layers
    fig, ax = _canvas(7.5, 6.2, f"{config.model_type}: {L} blocks of width d = {d}")
    steps = [(0.5, "token ids", "plain", f"({B}, {T}) integers"),
             (1.6, "embedding table (V x d)", "embed", f"({B}, {T}, {d}): one row per token"),
             (3.0, f"block x {L}\nattention: positions mix\nMLP: each position alone", "attn", f"({B}, {T}, {d}) in and out"),
             (4.4, "final RMSNorm", "norm", f"({B}, {T}, {d})"),
             (5.5, "lm_head (d x V)", "embed", f"({B}, {T}, {V}): a score per vocabulary entry")]
    for (y, text, kind, shape), nxt in zip(steps, steps[1:] + [None]):
        _box(ax, 2.6, y, 3.2, 1.0 if "block" in text else 0.55, text, kind)
        ax.text(4.5, y, shape, va="center", fontsize=9, family="monospace")
        if nxt:
            _arrow(ax, (2.6, y + (0.5 if "block" in text else 0.28)), (2.6, nxt[0] - (0.5 if "block" in nxt[1] else 0.28)))
    return fig


def block_diagrams():
    """nb3: where the norms sit, with the residual stream (the vertical line on the left) drawn: the original
    Transformer's post-LN, OLMo 1's pre-norm and OLMo 2's reordered norm."""
    fig, axes = plt.subplots(1, 3, figsize=(11, 5.6))
    specs = [("original Transformer (post-LN)", "the norm sits on the stream", "after"),
             ("OLMo 1 (pre-norm)", "the norm on the branch's input", "before"),
             ("OLMo 2 and 3 (reordered norm)", "the norm on the branch's output", "output")]
    for ax, (title, subtitle, where) in zip(axes, specs):
        ax.set_xlim(0, 4); ax.set_ylim(0, 8); ax.axis("off")
        ax.set_title(f"{title}\n{subtitle}", fontsize=10)
        ax.text(1, 0.05, "x", ha="center", fontsize=10)
        y = 0.3
        for branch in ("attention", "MLP"):
            boxes = {"after": [branch], "before": ["LayerNorm", branch], "output": [branch, "RMSNorm"]}[where]
            fork, add = y + 0.3, y + 0.9 + 0.7 * len(boxes)
            ax.plot([1, 1], [y, add - 0.14], color="black", lw=1.5)  # the stream goes straight up
            ax.plot([1, 2.6], [fork, fork], color="black", lw=1)  # the branch leaves it...
            by = fork + 0.55
            _arrow(ax, (2.6, fork), (2.6, by - 0.22))
            for b, nxt in zip(boxes, boxes[1:] + [None]):
                _box(ax, 2.6, by, 1.5, 0.44, b, "norm" if "Norm" in b else ("attn" if b == "attention" else "mlp"), 8)
                _arrow(ax, (2.6, by + 0.22), (2.6, by + 0.48) if nxt else (2.6, add))
                by += 0.7
            _arrow(ax, (2.6, add), (1.14, add))  # ...and is added back
            _plus(ax, 1, add)
            y = add + 0.14
            if where == "after":  # normalizes the stream itself: what the next layer and the output see
                ax.plot([1, 1], [y, y + 0.16], color="black", lw=1.5)
                _box(ax, 1, y + 0.38, 1.3, 0.44, "LayerNorm", "norm", 8)
                y += 0.6
        ax.plot([1, 1], [y, 7.6], color="black", lw=1.5)
        ax.text(1.1, 7.6, "to the next block", fontsize=8, va="top")
        ax.text(0.9, 6.3, "residual stream", rotation=90, fontsize=8, color="gray", ha="right", va="center")
    plt.tight_layout()
    return fig


def file_layout(header, header_bytes, file_bytes):
    """nb5: a safetensors file as its bytes lie on disk: 8 bytes giving the header's length, the JSON header, then
    every tensor's bytes at the offsets the header gives (the larger ones named)."""
    fig, ax = plt.subplots(figsize=(10, 2.6))
    start = 8 + header_bytes
    ax.add_patch(Rectangle((0, 0), start, 1, fc=COLORS["norm"], ec="black", lw=0.3))
    ax.annotate(f"length (8 bytes) + JSON header ({header_bytes} bytes)", (start / 2, 1), xytext=(0, 3.0),
                fontsize=7, arrowprops=dict(arrowstyle="-", lw=0.5))
    tensors = sorted((info["data_offsets"], name) for name, info in header.items() if name != "__metadata__")
    for i, ((b, e), name) in enumerate(tensors):
        ax.add_patch(Rectangle((start + b, 0), e - b, 1, fc=COLORS["attn" if i % 2 else "mlp"], ec="black", lw=0.3))
        if e - b > 0.05 * file_bytes:
            ax.text(start + (b + e) / 2, 1.1, name.replace("model.", ""), rotation=30, fontsize=7, ha="left", va="bottom")
    ax.set_xlim(0, file_bytes); ax.set_ylim(0, 3.3); ax.set_yticks([])
    ax.set_xlabel(f"byte offset in the file ({file_bytes} bytes, {len(tensors)} tensors; the small ones, norms, unnamed)")
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    plt.tight_layout()
    return fig


def unit_circle(theta_i, m, n):
    """nb2: one RoPE pair of a query at position m and a key at position n, each turned by its position times
    the pair's frequency: the angle between them is (n - m) * theta_i whatever m and n are."""
    fig, axes = plt.subplots(1, 2, figsize=(8.5, 4.2))
    for ax, shift in zip(axes, (0, 5)):
        ax.add_patch(Circle((0, 0), 1, fill=False, color="gray", lw=0.8))
        for pos, color, name in [(m + shift, "tab:blue", "q"), (n + shift, "tab:red", "k")]:
            a = pos * theta_i
            ax.add_patch(FancyArrowPatch((0, 0), (math.cos(a), math.sin(a)), arrowstyle="-|>", mutation_scale=12,
                                         color=color, lw=2))
            ax.text(1.18 * math.cos(a), 1.18 * math.sin(a), f"{name} at {pos}", color=color, ha="center", va="center")
        a0, a1 = (m + shift) * theta_i, (n + shift) * theta_i
        arc = [a0 + (a1 - a0) * t / 40 for t in range(41)]
        ax.plot([0.45 * math.cos(a) for a in arc], [0.45 * math.sin(a) for a in arc], color="black", lw=1)
        ax.text(0.62 * math.cos((a0 + a1) / 2), 0.62 * math.sin((a0 + a1) / 2), f"({n + shift} - {m + shift}) θ",
                ha="center", fontsize=9)
        ax.set_xlim(-1.5, 1.5); ax.set_ylim(-1.5, 1.5); ax.set_aspect("equal"); ax.axis("off")
        ax.set_title(f"positions {m + shift} and {n + shift}")
    plt.tight_layout()
    return fig


def kv_cache(n_past, layers=2, heads_dim=6):
    """nb4: what one decoding step reads and writes: per layer, the cache holds a key and a value per past
    position; the new token appends its own and its query reads them all."""
    fig, ax = _canvas(9, 1.6 + 1.9 * layers, f"decoding token {n_past + 1}: each layer appends one key and one value")
    for layer in range(layers):
        y0 = 0.5 + 1.9 * layer
        for r, name in enumerate(("V", "K")):
            y = y0 + r * 0.8
            ax.text(0.45, y + 0.3, name, fontsize=10, ha="center", va="center")
            for t in range(n_past + 1):
                new = t == n_past
                ax.add_patch(Rectangle((0.8 + t * 0.55, y), 0.5, 0.6, fc=COLORS["state"] if new else COLORS["embed"],
                                       ec="black", lw=0.6))
        ax.text(0.8 + (n_past + 1) * 0.55 + 0.2, y0 + 0.7, f"layer {layer}: {n_past} cached + 1 new\n"
                f"(each cell: KV heads x {heads_dim} numbers)\nthe new query is compared with all\n"
                f"{n_past + 1} keys and mixes all {n_past + 1} values", fontsize=8, va="center")
        _arrow(ax, (0.8 + n_past * 0.55 + 0.25, y0 - 0.25), (0.8 + n_past * 0.55 + 0.25, y0))
    ax.text(0.8 + n_past * 0.55 + 0.25, 0.05, "new token", fontsize=8, ha="center")
    return fig


def router(probs, k, token="a token"):
    """nb7: one token's route: the router's probability for every expert, the k largest kept, their outputs
    summed with those probabilities as weights."""
    E = len(probs)
    chosen = sorted(range(E), key=lambda e: -probs[e])[:k]
    fig, ax = _canvas(10, 4.6, f"routing {token}: {k} of {E} experts")
    _box(ax, 0.9, 0.6, 1.4, 0.5, f"{token}\n(d numbers)", "embed", 8)
    _arrow(ax, (1.6, 0.6), (2.2, 0.6))
    _box(ax, 2.9, 0.6, 1.3, 0.5, "router\nlinear d x E", "norm", 8)
    width = 5.2 / E
    for e, p in enumerate(probs):
        x = 3.8 + e * width
        keep = e in chosen
        ax.add_patch(Rectangle((x, 0.35), width * 0.8, 1.6 * p / max(probs), fc="tab:orange" if keep else "lightgray"))
        if keep:
            ax.text(x + width * 0.4, 0.35 + 1.6 * p / max(probs) + 0.05, f"{p:.2f}", ha="center", fontsize=7)
            _box(ax, x + width * 0.4, 3.0, max(width * 0.9, 0.5), 0.5, f"expert\n{e}", "mlp", 7)
            _arrow(ax, (x + width * 0.4, 2.1), (x + width * 0.4, 2.75))
            _arrow(ax, (x + width * 0.4, 3.25), (8.6, 4.0), connectionstyle="arc3,rad=0")
    ax.text(3.8, 0.15, "softmax over all experts; top-k in orange", fontsize=8)
    _box(ax, 9.0, 4.0, 1.6, 0.5, "sum of the k\noutputs x weights", "plain", 8)
    return fig


def parameters_read(rows):
    """nb7: per model, all its parameters and those one decoded token reads, with the bytes that makes in bfloat16.
    rows: (name, total, read). The legend sits above the bars, clear of the labels at their ends."""
    fig, ax = plt.subplots(figsize=(8.5, 3.3))
    names = [name for name, _, _ in rows]
    ax.barh(names, [total / 1e9 for _, total, _ in rows], color="C7", label="total parameters")
    ax.barh(names, [read / 1e9 for _, _, read in rows], color="C1", label="read per decoded token (all but the embedding table)")
    for i, (_, total, read) in enumerate(rows):
        ax.text(total / 1e9, i, f" {read / 1e9:.1f} of {total / 1e9:.1f} B: {2 * read / 1e9:.1f} GB per token in bf16",
                va="center", fontsize=8)
    ax.set_xlim(0, 1.6 * max(total for _, total, _ in rows) / 1e9); ax.invert_yaxis()
    ax.set_xlabel("billions of parameters")
    ax.legend(fontsize=8, ncol=2, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    plt.tight_layout()
    return fig


def gated_deltanet(config, name):
    """nb8: a Gated DeltaNet layer (olmo.GatedDeltaNet) from its input to its output, per token, with the sizes of
    config (model name): six projections of x, the state it updates and carries to the next token, the gated output."""
    d, K, beta_max = config.hidden_size, config.linear_conv_kernel_dim, 2 if config.linear_allow_neg_eigval else 1
    n_k, n_v, d_k, d_v = (config.linear_num_key_heads, config.linear_num_value_heads, config.linear_key_head_dim,
                          config.linear_value_head_dim)
    fig, ax = _canvas(10.5, 6.2, f"a Gated DeltaNet layer of {name}, per token (d = {d})")
    _box(ax, 0.55, 0.45, 0.9, 0.45, "x (d)", "embed")
    branches = [(1.75, f"q_proj: {n_k} x {d_k}\nconv {K}, SiLU\nL2 norm, / √d_k", "q", "attn"),
                (3.35, f"k_proj: {n_k} x {d_k}\nconv {K}, SiLU\nL2 norm", "k", "attn"),
                (4.95, f"v_proj: {n_v} x {d_v}\nconv {K}, SiLU", "v", "attn"),
                (6.5, f"b_proj: {n_v}\n{beta_max} sigmoid(b)", "β", "plain"),
                (8.05, f"a_proj: {n_v}\n-exp(A_log) x\nsoftplus(a + dt_bias)", "g", "plain"),
                (9.65, f"g_proj:\n{n_v} x {d_v}", "gate", "plain")]
    ax.plot([1.0, branches[-1][0]], [0.45, 0.45], color="black", lw=1)  # x goes to every projection
    for x, text, label, kind in branches:
        _arrow(ax, (x, 0.45), (x, 1.05))
        _box(ax, x, 1.5, 1.42, 0.85, text, kind, 7)
        ax.text(x + 0.6, 2.05, label, fontsize=10, color="darkred")
    state = (f"state S: {n_v} heads x d_k x d_v = {n_v} x {d_k} x {d_v}, float32\n"
             "S ← exp(g) S,   then   S ← S + β k (v - Sᵀk)ᵀ\nread:  o = Sᵀ q")
    _box(ax, 4.6, 3.35, 6.6, 0.95, state, "state", 8)
    for x, *_ in branches[:-1]:  # all but the output gate feed the state
        _arrow(ax, (x, 1.95), (min(x, 7.7), 2.87))
    ax.text(8.1, 3.35, "S and the conv's last\nK - 1 inputs are kept\nfor the next token", fontsize=8, va="center")
    _box(ax, 4.6, 4.75, 3.4, 0.5, "RMSNorm(o) per head  x  SiLU(gate)", "norm", 8)
    _arrow(ax, (4.6, 3.83), (4.6, 4.5))
    _arrow(ax, (branches[-1][0], 1.95), (6.3, 4.75), connectionstyle="angle,angleA=90,angleB=0")  # the output gate
    _box(ax, 4.6, 5.7, 2.4, 0.45, "o_proj → out (d)", "embed", 8)
    _arrow(ax, (4.6, 5.0), (4.6, 5.47))
    return fig


def next_byte(context, predictions, n=8):
    """nb6: several models' probabilities for the byte after context, side by side, on the n likeliest bytes."""
    names = list(predictions)
    top = sum(predictions.values()).topk(n).indices
    fig, ax = plt.subplots(figsize=(7, 3.2))
    w = 0.8 / len(names)
    for j, name in enumerate(names):
        ax.bar([i + w * (j - (len(names) - 1) / 2) for i in range(n)], predictions[name][top].tolist(), width=w, label=name)
    ax.set_xticks(range(n)); ax.set_xticklabels(["␣" if b == 32 else repr(chr(b))[1:-1] for b in top.tolist()])
    ax.set_ylabel("probability"); ax.set_title(f"the next byte after {context!r}"); ax.legend()
    plt.tight_layout()
    return fig


def attention_heads(probs_by_layer, labels, title):
    """nb2: each head's attention probabilities (rows: queries, columns: keys), one row of panels per layer."""
    rows, heads = len(probs_by_layer), len(next(iter(probs_by_layer.values())))
    fig, axes = plt.subplots(rows, heads, figsize=(15, 4.2 * rows), layout="constrained", squeeze=False)
    for r, (layer, probs) in enumerate(probs_by_layer.items()):
        for h, ax in enumerate(axes[r]):
            im = ax.imshow(probs[h], cmap="viridis", vmin=0, vmax=1)
            ax.set_title(f"layer {layer}, head {h}", fontsize=10)
            ax.set_xticks(range(len(labels))); ax.set_xticklabels(labels if r == rows - 1 else [], fontsize=6.5)
            ax.set_yticks(range(len(labels))); ax.set_yticklabels(labels if h == 0 else [], fontsize=6.5)
    fig.colorbar(im, ax=axes, shrink=0.6, label="attention probability")
    fig.suptitle(title)
    return fig


def sampling_panels(panels, labels, context):
    """nb4: the next-token distribution as each sampling setting leaves it. panels: (title, probabilities over the
    shown tokens, how many tokens stay possible)."""
    fig, axes = plt.subplots(2, 3, figsize=(13, 6), sharey=True)
    for ax, (title, p, possible) in zip(axes.flat, panels):
        ax.bar(range(len(labels)), p, color="C0")
        ax.set_title(f"{title}\n{possible} bytes possible, {p.sum():.0%} shown", fontsize=10)
        ax.set_xticks(range(len(labels))); ax.set_xticklabels(labels, fontsize=8)
        ax.set_xlabel(f"next byte after {context!r}", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("probability")
    plt.tight_layout()
    return fig
