"""Every figure: training curves, the FDT inspection pictures, the study's comparisons.

    plot_history          loss, lr, logit scale and evaluation metrics of one run (train.py)
    plot_image_tokens     an image's top FDT tokens and the patches that ground each
                          (eval.py inspect)
    plot_text_tokens      a caption's top FDT tokens and the words that ground each
    plot_shared_tokens    an image's and a caption's FDT weights side by side
    plot_concept_tokens   the concept-by-token matrix (from eval.concept_profiles)
    plot_study            CLIP vs CLIP+FDT: curves and binding accuracy per kind (study.py)

Metrics are computed elsewhere (metrics.py, eval.py); this file only draws. Files only, no display
needed.
"""

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import data


def pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    return plt


def plot_eval_metrics(ax, records, keys=("rsum", "zs_shape", "zs_colour", "zs_heldout"), label="",
                      **style):
    """Evaluation records (dicts with "step" and metrics) over steps on one percent axis: rsum, out
    of 600, is drawn divided by 6."""
    for key in keys:
        if records and key in records[0]:
            scale = 1 / 6 if key == "rsum" else 1
            ax.plot([r["step"] for r in records], [r[key] * scale for r in records], marker="o",
                    label=f"{label}{key}{' / 6' if key == 'rsum' else ''}", **style)
    ax.set(title="evaluation (%)", xlabel="step")


def save(fig, path, dpi=100):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    pyplot().close(fig)
    return path


@torch.no_grad()
def plot_image_tokens(model, image, path, k=6):
    """An image's k highest-weighted FDT tokens, and for each the relevance of every patch: the
    token's score is the max over patches, so the bright patch is the one that activated it."""
    plt, device, S = pyplot(), model.logit_scale.device, model.config.image_size
    x = data.preprocess(image[None].to(device))                               # (1, 3, S, S)
    w = model.encode_image(x, return_weights=True)[1][0]                      # (n_fdt,)
    relevance = model.image_relevance(x)[0]                                   # (N, n_fdt)
    top = w.topk(min(k, int((w > 0).sum())))
    g = S // model.config.patch_size
    fig, axes = plt.subplots(1, len(top.indices) + 2, figsize=(2.2 * (len(top.indices) + 2), 2.6))
    picture = image.permute(1, 2, 0).cpu().numpy()                            # (S, S, 3)
    axes[0].imshow(picture)
    axes[0].set_title(f"image ({int((w > 0).sum())} active)", fontsize=9)
    axes[1].bar(range(len(top.indices)), top.values.cpu().numpy(), color="tab:blue")
    axes[1].set_xticks(range(len(top.indices)), [f"#{i}" for i in top.indices.tolist()],
                       rotation=90, fontsize=7)
    axes[1].set_title("top FDT weights", fontsize=9)
    for ax, token, weight in zip(axes[2:], top.indices.tolist(), top.values.tolist()):
        # (g, g), patches in raster order
        heat = relevance[:, token].view(g, g).cpu().numpy()
        ax.imshow(picture)
        ax.imshow(heat, cmap="inferno", alpha=0.6, extent=(0, S, S, 0), interpolation="nearest")
        ax.set_title(f"#{token}  w={weight:.2f}", fontsize=9)
    for ax in axes:
        if ax is not axes[1]:
            ax.axis("off")
    return save(fig, path)


@torch.no_grad()
def plot_text_tokens(model, tokenizer, caption, path, k=6):
    """A caption's k highest-weighted FDT tokens and each one's relevance to every word; the dot
    marks the word that wins the max-pool, i.e. the word that activated the token."""
    plt, device = pyplot(), model.logit_scale.device
    tokens = tokenizer.encode([caption]).to(device)                           # (1, L)
    w = model.encode_text(tokens, return_weights=True)[1][0]                  # (n_fdt,)
    # (1, L, n_fdt), (1, L)
    relevance, mask = model.text_relevance(tokens)
    n = int(mask[0].sum())
    words = tokenizer.decode_ids(tokens[0, :n])
    top = w.topk(min(k, int((w > 0).sum())))
    grid = relevance[0, :n, top.indices].t().cpu().numpy()                    # (k, n): token x word
    fig, (ax_w, ax_r) = plt.subplots(1, 2, figsize=(3 + 0.55 * n, 1.5 + 0.4 * len(top.indices)),
                                     gridspec_kw={"width_ratios": [1, max(2, n / 3)]})
    labels = [f"#{i}" for i in top.indices.tolist()]
    ax_w.barh(range(len(labels)), top.values.cpu().numpy(), color="tab:orange")
    ax_w.set_yticks(range(len(labels)), labels, fontsize=8)
    ax_w.invert_yaxis()
    ax_w.set_title("FDT weight", fontsize=9)
    im = ax_r.imshow(grid, cmap="viridis", aspect="auto")
    ax_r.scatter(grid.argmax(axis=1), range(len(labels)), color="red", s=12)
    ax_r.set_xticks(range(n), words, rotation=60, ha="right", fontsize=8)
    ax_r.set_yticks(range(len(labels)), labels, fontsize=8)
    ax_r.set_title(f'relevance of each word: "{caption}"', fontsize=9)
    fig.colorbar(im, ax=ax_r, fraction=0.03)
    return save(fig, path)


@torch.no_grad()
def plot_shared_tokens(model, tokenizer, image, caption, path, k=12):
    """The FDT weights of an image and a caption side by side, on the k tokens with the largest
    summed weight: a matched pair should put its weight on the same tokens."""
    plt, device = pyplot(), model.logit_scale.device
    # (n_fdt,)
    wi = model.encode_image(data.preprocess(image[None].to(device)), return_weights=True)[1][0]
    # (n_fdt,)
    wt = model.encode_text(tokenizer.encode([caption]).to(device), return_weights=True)[1][0]
    top = (wi + wt).topk(min(k, len(wi))).indices.tolist()                  # FDT token ids
    shared = int(((wi > 0) & (wt > 0)).sum())
    fig, (ax_i, ax_b) = plt.subplots(1, 2, figsize=(11, 2.8), gridspec_kw={"width_ratios": [1, 4]})
    ax_i.imshow(image.permute(1, 2, 0).cpu().numpy())
    ax_i.axis("off")
    x = np.arange(len(top))
    ax_b.bar(x - 0.2, wi[top].cpu().numpy(), width=0.4, label="image")
    ax_b.bar(x + 0.2, wt[top].cpu().numpy(), width=0.4, label="caption")
    ax_b.set_xticks(x, [f"#{t}" for t in top], fontsize=8)
    ax_b.legend(fontsize=8)
    ax_b.set_title(f'"{caption}": {shared} tokens active in both (image {int((wi > 0).sum())}, '
                   f"caption {int((wt > 0).sum())}); "
                   f"cosine {F.cosine_similarity(wi, wt, dim=0):.2f}", fontsize=9)
    return save(fig, path)


def plot_concept_tokens(profiles, path, per_concept=2):
    """The concept-by-token matrix, from eval.concept_profiles: for every colour and shape word,
    the mean FDT weights of the images showing it and of the prompts naming it, on each concept's
    top tokens, and the cosine of the two profiles for every pair of concepts. The paper's claim is
    that the same tokens light up in both panels."""
    plt = pyplot()
    concepts, image_rows, text_rows, cosine = (profiles[k]
                                               for k in ("concepts", "image", "text", "cosine"))
    columns = []  # each concept's top tokens by its image and text weights summed, in concept order
    # (16, n_fdt) summed: a row per concept
    for row in image_rows + text_rows:
        columns += [t for t in row.topk(per_concept).indices.tolist() if t not in columns]

    fig, axes = plt.subplots(1, 3, figsize=(6 + 0.5 * len(columns), 5.5), layout="constrained",
                             gridspec_kw={"width_ratios": [len(columns), len(columns),
                                                           len(concepts)]})
    for ax, rows, title in ((axes[0], image_rows, "images showing the concept"),
                            (axes[1], text_rows, "prompts naming the concept")):
        block = rows[:, columns]                                              # (16, n_columns)
        ax.imshow((block / block.amax(dim=1, keepdim=True).clamp(min=1e-12)).cpu().numpy(),
                  cmap="magma", vmin=0)
        ax.set_xticks(range(len(columns)), [f"#{t}" for t in columns], rotation=90, fontsize=7)
        ax.set_yticks(range(len(concepts)), concepts, fontsize=8)
        ax.set_title(f"{title}\n(mean FDT weight / row max)", fontsize=9)
    axes[2].imshow(cosine.cpu().numpy(), cmap="viridis")
    axes[2].set_xticks(range(len(concepts)), concepts, rotation=90, fontsize=7)
    axes[2].set_yticks(range(len(concepts)), concepts, fontsize=7)
    axes[2].set_xlabel("caption concept")
    axes[2].set_ylabel("image concept")
    axes[2].set_title(f"cosine of weight profiles\nsame {profiles['same_concept_cosine']:.2f}, "
                      f"other {profiles['other_concept_cosine']:.2f}", fontsize=9)
    return save(fig, path)


def plot_history(history, path):
    """loss, lr, logit scale and eval metrics over steps, one PNG refreshed every epoch."""
    plt = pyplot()
    train = [h for h in history if h["kind"] == "train"]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.2))
    for ax, key, title in zip(axes[:3], ("loss", "lr", "logit_scale"),
                              ("train loss", "learning rate", "logit scale (exp)")):
        ax.plot([h["step"] for h in train], [h[key] for h in train])
        ax.set(title=title, xlabel="step")
    evals = [h for h in history if h["kind"] == "eval"]
    # none yet when Ctrl-C comes before the first epoch ends
    if evals:
        plot_eval_metrics(axes[3], evals)
        axes[3].legend(fontsize=7)
    fig.tight_layout()
    return save(fig, path, dpi=80)


def plot_study(histories, summary, curves_path, binding_path, seed=0):
    """The study's two figures. histories: run name -> metrics.jsonl records (of one seed, `seed`);
    summary: run name -> {metric header: values over seeds}, in percent."""
    plt = pyplot()
    colours = {"CLIP": "tab:blue", "CLIP+FDT": "tab:orange"}
    fig, (ax_loss, ax_eval) = plt.subplots(1, 2, figsize=(11, 3.6))
    for name, records in histories.items():
        train = [r for r in records if r["kind"] == "train"]
        ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train],
                     color=colours.get(name), label=name)
        evals = [r for r in records if r["kind"] == "eval"]
        for key, style in (("zs_shape", "-"), ("bind_swap_colour", "--"),
                           ("bind_replace_shape", ":")):
            plot_eval_metrics(ax_eval, evals, keys=(key,), label=f"{name} ",
                              color=colours.get(name), linestyle=style)
    ax_loss.set(title=f"training loss (seed {seed})", xlabel="step")
    ax_loss.legend()
    ax_eval.legend(fontsize=7)
    fig.tight_layout()
    save(fig, curves_path, dpi=80)

    headers = list(next(iter(summary.values())))
    fig, ax = plt.subplots(figsize=(1.1 * len(headers) + 2, 3.6))
    x = np.arange(len(headers))
    width = 0.8 / len(summary)
    for i, (name, metrics) in enumerate(summary.items()):
        means = [np.mean(metrics[h]) for h in headers]
        stds = [np.std(metrics[h], ddof=1) if len(metrics[h]) > 1 else 0 for h in headers]
        ax.bar(x + (i - (len(summary) - 1) / 2) * width, means, width, yerr=stds, capsize=3,
               color=colours.get(name), label=f"{name} ({len(metrics[headers[0]])} seeds)")
    ax.axhline(50, color="grey", linewidth=0.8, linestyle="--")
    ax.text(len(headers) - 0.5, 51, "chance for the binding tests", fontsize=7, ha="right",
            color="grey")
    ax.set_xticks(x, headers, rotation=20, ha="right", fontsize=8)
    ax.set(ylabel="%", ylim=(0, 100),
           title="zero-shot and binding accuracy, mean ± std over seeds")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save(fig, binding_path, dpi=80)
