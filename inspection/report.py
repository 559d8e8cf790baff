"""`pipeline.py report`: a run folder's training curves, embedding geometry and errors, as
`report.md` and PNGs written beside the run's other files.

What it shows and why:
  losses.png      every loss term and the step-two firing rate per epoch, one line per seed
                  (from log.csv), to see whether the gated pull still fires late in training;
  distances.png   cosine distances of the test embeddings (HeadOutput.image / .text; SPP-SCL's
                  I_a, T_a) between items of the same label and of different labels: the paper's
                  intra-image (IID), intra-text (TTD) and image-text (ITD) distance distributions;
  tsne.png        t-SNE of the image, text and fused embeddings of test, coloured by label;
  confusion.png   the confusion matrix of each seed on test, per-class F1 in report.md.
Embeddings come from the first seed's head and are computed label-blind: test is fed in the
first seeded random order of `scoring.eval_orders` (a batch-scope head attends over its batch
mates, so the stored label-sorted order would show a geometry the scores never see).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from sklearn.manifold import TSNE  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay, confusion_matrix, f1_score  # noqa: E402
from sklearn.metrics.pairwise import cosine_distances  # noqa: E402

from core.device import device  # noqa: E402
from core.errors import UserError  # noqa: E402
from core.paths import write_atomic, write_png  # noqa: E402
from train.data import Split  # noqa: E402
from train.run_folder import RunFolder  # noqa: E402
from train.scoring import eval_orders, forward, predict  # noqa: E402

KINDS = ("image", "text", "fused")

# what each loss term and distance distribution is, for report.md (a head's terms: heads/<head>.py)
TERMS = {
    "ce": "cross-entropy of the head's logits against the labels (weighted by lambda_ce in SPP-SCL)",
    "cli": "intra-image supervised contrastive loss (SupCon over the image embeddings I_a: same label pulled "
           "together)",
    "clt": "intra-text supervised contrastive loss (SupCon over the text embeddings T_a)",
    "clm": "cross-modal supervised contrastive loss L_clm between text and image embeddings (in step one: "
           "the one-step ablation)",
    "step2_clm": "L_clm in SPP-SCL's gated second step, averaged over the batches where the step ran",
    "clip": "CLIP-style contrastive loss between the projected image and text features (CLIP-CA-CG)",
    "aux": "auxiliary cross-entropy of the branch classifiers (hybrid fusion)",
    "step_two_rate": "share of batches in which the gated second step ran (gate: c < alpha * c_mask)",
}
DISTANCES = {
    "IID": "intra-image distance: cosine distance between the image embeddings of two test items",
    "TTD": "intra-text distance: the same between text embeddings",
    "ITD": "image-text distance: between the image embedding of one item and the text embedding of another "
           "(or the same) item",
}


def _mean(a: np.ndarray) -> float:
    """The mean, NaN for no values (a tiny split may have no pair of a kind), without a warning."""
    return float(a.mean()) if a.size else float("nan")


def embeddings(head, split: Split, batch_size: int, order: torch.Tensor) -> dict[str, np.ndarray | None]:
    """HeadOutput.image / .text / .fused of every item in the split's index order, fed in `order`
    (label-blind); None for an embedding the head does not return."""
    out = forward(head, split, batch_size, device(), order)
    return {k: None if getattr(out, k) is None else getattr(out, k).numpy() for k in KINDS}


def distance_groups(a: np.ndarray, b: np.ndarray, labels: np.ndarray, cross: bool) -> tuple[np.ndarray, np.ndarray]:
    """Cosine distances between rows of `a` and `b`, split into same-label and different-label pairs.

    Intra-modal (`cross=False`, a is b): each unordered pair i < j once. Image-text (`cross=True`):
    every (image i, text j) pair, the matched pairs i == j among the same-label ones.
    """
    d = cosine_distances(a, b)
    same = labels[:, None] == labels[None, :]
    keep = np.ones_like(same) if cross else np.triu(np.ones_like(same), k=1)
    return d[keep & same], d[keep & ~same]


def plot_losses(log: pd.DataFrame, path: Path, title: str = "") -> list[str]:
    """One panel per loss term and one for the step-two rate, a line per seed; returns the columns drawn."""
    cols = [c for c in log.columns if c.startswith("loss_")] + ["step_two_rate"]
    fig, axes = plt.subplots(1, len(cols), figsize=(3.2 * len(cols), 3), squeeze=False)
    for ax, col in zip(axes[0], cols):
        for seed, rows in log.groupby("seed"):
            ax.plot(rows["epoch"], rows[col], marker=".", label=f"seed {seed}")
        ax.set_title(col.removeprefix("loss_"))
        ax.set_xlabel("epoch")
        ax.set_ylabel("share of batches" if col == "step_two_rate" else "loss (mean over batches)")
    axes[0][-1].set_ylim(-0.05, 1.05)
    axes[0][0].legend(fontsize="small")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    write_png(path, fig, dpi=100)
    plt.close(fig)
    return cols


def plot_distances(groups: dict[str, tuple[np.ndarray, np.ndarray]], path: Path, title: str = "") -> None:
    fig, axes = plt.subplots(1, len(groups), figsize=(4 * len(groups), 3.2), squeeze=False)
    for ax, (name, (same, diff)) in zip(axes[0], groups.items()):
        both = np.concatenate([same, diff])  # cosine distance lies in [0, 2]; trained embeddings use a sliver of it
        lo, hi = (float(both.min()), float(both.max())) if both.size else (0.0, 2.0)
        bins = np.linspace(lo, hi if hi > lo else lo + 1e-3, 41)
        for values, label in ((same, "same label"), (diff, "different label")):
            if values.size:  # a tiny split may have no pair of a kind: no density to draw
                ax.hist(values, bins=bins, density=True, alpha=0.6, label=label)
        ax.set_title(name)
        ax.set_xlabel("cosine distance")
        ax.set_ylabel("density (pairs)")
    axes[0][0].legend(fontsize="small") if axes[0][0].get_legend_handles_labels()[0] else None
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    write_png(path, fig, dpi=100)
    plt.close(fig)


def plot_tsne(emb: dict[str, np.ndarray], labels: np.ndarray, classes: list[str], path: Path, seed: int,
              title: str = "") -> None:
    fig, axes = plt.subplots(1, len(emb), figsize=(4 * len(emb), 4), squeeze=False)
    # perplexity must stay below the number of points (tiny test splits)
    perplexity = float(min(30, max(2, (len(labels) - 1) // 3)))
    for ax, (name, x) in zip(axes[0], emb.items()):
        xy = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)
        for c, cname in enumerate(classes):
            m = labels == c
            ax.scatter(xy[m, 0], xy[m, 1], s=8, label=cname)
        ax.set_title(f"{name} ({x.shape[1]}-d)")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel("t-SNE 1")
        ax.set_ylabel("t-SNE 2")
    axes[0][0].legend(fontsize="small", markerscale=2)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    write_png(path, fig, dpi=100)
    plt.close(fig)


def plot_confusions(matrices: dict[int, np.ndarray], classes: list[str], path: Path, title: str = "") -> None:
    fig, axes = plt.subplots(1, len(matrices), figsize=(3.6 * len(matrices), 3.4), squeeze=False)
    for ax, (seed, cm) in zip(axes[0], matrices.items()):
        shown = ConfusionMatrixDisplay(cm, display_labels=classes).plot(ax=ax, colorbar=False, xticks_rotation=45,
                                                                        cmap="Blues")
        for (i, j), text in np.ndenumerate(shown.text_):  # white on dark cells, black on light ones
            text.set_color("white" if _luminance(shown.im_.cmap(shown.im_.norm(cm[i, j]))) < 0.5 else "black")
        ax.set_title(f"seed {seed}")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    write_png(path, fig, dpi=100)
    plt.close(fig)


def _luminance(rgba) -> float:
    """Relative luminance of a colour (Rec. 709 weights): below 0.5 reads as dark."""
    return 0.2126 * rgba[0] + 0.7152 * rgba[1] + 0.0722 * rgba[2]


def write_report(run: Path, cache_dir: Path | None = None) -> Path:
    """Write `report.md` and its PNGs into run folder `run`; return the path of report.md. Each
    section (and its figure) is its own function, in the order the report reads."""
    run = Path(run)
    folder = RunFolder(run)
    saved, cfg, data = folder.open(cache_dir)
    # an interrupted or still-running train: report the seeds that have weights, and say so
    seeds = [s for s in cfg.seeds if folder.has_weights(s)]
    if not seeds:
        raise UserError(f"{run} has no seed-<s>.pt yet: wait for train to finish a seed, or train again")
    test = data.splits["test"]
    y = test.labels.numpy()
    order = eval_orders(len(test), cfg, 1)[0]
    md = [f"# Report: {run.name}", "",
          f"Head `{cfg.head}` on `{cfg.dataset}` ({len(test)} test items), seeds {', '.join(map(str, cfg.seeds))}. "
          f"Test is fed label-blind, in the first seeded random order (eval_seed {cfg.eval_seed}), "
          f"batches of {cfg.eval_batch_size}.", ""]
    who = f"{run.name} ({cfg.head} on {cfg.dataset})"  # every figure's title names the run
    md += _loss_section(folder.log_frame(), run, who, cfg.head)
    if len(seeds) < len(cfg.seeds):
        md += [f"Seeds without weights yet (train interrupted or still running), left out below: "
               f"{', '.join(str(s) for s in cfg.seeds if s not in seeds)}.", ""]
    first = seeds[0]
    emb = embeddings(folder.load_head(cfg, data.dims, first), test, cfg.eval_batch_size, order)
    md += _distance_section(emb, y, run, who, first)
    md += _tsne_section(emb, y, data.classes, run, who, first, cfg.eval_seed)
    md += _confusion_section(folder, cfg, data, seeds, order, run, who)
    out = run / "report.md"
    write_atomic(out, "\n".join(md))
    return out


def _loss_section(log, run: Path, who: str, head: str) -> list[str]:
    """Loss terms and the step-two firing rate per epoch (losses.png), and each seed's last epoch."""
    cols = plot_losses(log, run / "losses.png", f"{who}: loss terms per epoch, seeds "
                                                 f"{', '.join(map(str, sorted(log['seed'].unique())))}")
    last = log.sort_values(["seed", "epoch"]).groupby("seed").tail(1).set_index("seed")[cols]
    return ["## Loss terms and step-two firing rate per epoch", "", "![losses](losses.png)", "",
            *[f"- `{c.removeprefix('loss_')}`: {TERMS.get(c.removeprefix('loss_'), f'a loss term of head {head} (heads/)')}"
              for c in cols], "",
            "Last epoch of each seed:", "", _table(["seed", *cols], [[s, *(f"{v:.4f}" for v in r)] for s, r in last.iterrows()]), ""]


def _distance_section(emb: dict, y: np.ndarray, run: Path, who: str, first: int) -> list[str]:
    """Cosine distances of seed `first`'s test embeddings (distances.png), same label against
    different label, for each pair of embeddings the head returns."""
    md = [f"## Embedding distances on test (seed {first}, cosine)", ""]
    pairs = {"intra-image (IID)": ("image", "image", False), "intra-text (TTD)": ("text", "text", False),
             "image-text (ITD)": ("image", "text", True)}
    groups, skipped = {}, []
    for name, (a, b, cross) in pairs.items():
        if emb[a] is None or emb[b] is None:
            skipped.append(f"- {name}: skipped, the head returns no {a if emb[a] is None else b} embedding.")
            continue
        groups[name] = distance_groups(emb[a], emb[b], y, cross)
    if groups:
        plot_distances(groups, run / "distances.png", f"{who}, seed {first}: cosine distances of test embeddings")
        md += ["![distances](distances.png)", "",
               *[f"- {k}: {v}; same label vs different label." for k, v in DISTANCES.items()
                 if any(k in n for n in groups)], "",
               _table(["distribution", "same label: mean", "different label: mean", "gap"],
                      [[n, f"{_mean(s):.4f}", f"{_mean(d):.4f}", f"{_mean(d) - _mean(s):.4f}"]
                       for n, (s, d) in groups.items()]), ""]
    return md + skipped + ([""] if skipped else [])


def _tsne_section(emb: dict, y: np.ndarray, classes: list[str], run: Path, who: str, first: int,
                  seed: int) -> list[str]:
    """t-SNE of seed `first`'s test embeddings (tsne.png, laid out from `seed`), each kind the head returns."""
    present = {k: v for k, v in emb.items() if v is not None}
    md = [f"## t-SNE of the test embeddings (seed {first})", ""]
    if present:
        plot_tsne(present, y, classes, run / "tsne.png", seed, f"{who}, seed {first}: t-SNE of test embeddings")
        md += ["![t-SNE](tsne.png)", ""]
    return md + [f"- {k}: skipped, the head returns no {k} embedding." for k in KINDS if emb[k] is None] + [""]


def _confusion_section(folder: RunFolder, cfg, data, seeds: list[int], order, run: Path, who: str) -> list[str]:
    """Every seed's confusion matrix on test (confusion.png) and its per-class F1, from its weights."""
    test, classes = data.splits["test"], data.classes
    y = test.labels.numpy()
    matrices, f1s = {}, []
    for seed in seeds:
        pred = predict(folder.load_head(cfg, data.dims, seed), test, cfg.eval_batch_size, device(), order)
        matrices[seed] = confusion_matrix(y, pred, labels=list(range(len(classes))))
        f1s.append([seed, *(f"{v:.4f}" for v in f1_score(y, pred, labels=list(range(len(classes))),
                                                          average=None, zero_division=0))])
    plot_confusions(matrices, classes, run / "confusion.png", f"{who}: confusion on test")
    return ["## Confusion matrix and per-class F1 on test", "", "Rows: true label, columns: predicted.", "",
            "![confusion](confusion.png)", "", _table(["seed", *classes], f1s), ""]
def _table(header: list, rows: list[list]) -> str:
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows])
