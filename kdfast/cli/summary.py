"""What a finished scoring run shows: a per-class score histogram, the hardest examples, a PNG grid.

Computing returns data (summarize, grid_examples); separate functions format or draw it.
"""
from __future__ import annotations

import numpy as np

_SPARKS = " ▁▂▃▄▅▆▇█"


def summarize(scores: np.ndarray, targets: np.ndarray, *, top: int = 10, bins: int = 10,
              files: list[str] | None = None, keys=None, class_names: list[str] | None = None) -> dict:
    """Per-class counts, mean, median and histogram over shared bins; the `top` hardest examples, named by their
    file (`files`, image folders) or key (`keys`, keyed sources). `class_names[c]` names class c (image folders:
    the folder names); default: the index."""
    name = (lambda c: class_names[c]) if class_names else str
    finite = np.isfinite(scores)
    lo, hi = (float(scores[finite].min()), float(scores[finite].max())) if finite.any() else (0.0, 1.0)
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
    classes = []
    for c in np.unique(targets):
        s = scores[targets == c]
        f = s[np.isfinite(s)]
        classes.append({"class": int(c), "name": name(int(c)), "count": int(len(s)),
                        "mean": float(f.mean()) if len(f) else float("nan"),
                        "median": float(np.median(f)) if len(f) else float("nan"),
                        "nonfinite": int(len(s) - len(f)), "hist": np.histogram(f, edges)[0].tolist()})
    # NaN (never scored) sorts last; stable sort so ties keep dataset order
    order = np.argsort(-np.nan_to_num(scores, nan=-np.inf), kind="stable")[:top]
    hardest = [{"index": int(i), "label": int(targets[i]), "name": name(int(targets[i])),
                "score": float(scores[i]),
                **({"file": files[i]} if files else {"key": keys[i]} if keys is not None else {})} for i in order]
    return {"num_examples": int(len(scores)), "edges": edges.tolist(), "classes": classes, "hardest": hardest}


def _spark(hist: list[int]) -> str:
    top = max(hist) or 1
    return "".join(_SPARKS[0 if h == 0 else 1 + int((len(_SPARKS) - 2) * h / top)] for h in hist)


def format_summary(summary: dict) -> str:
    edges = summary["edges"]
    width = max([6] + [len(row["name"]) for row in summary["classes"]])
    lines = [f"score histogram by class ({len(edges) - 1} bins from {edges[0]:.4g} to {edges[-1]:.4g}):",
             f"{'class':>{width}} {'count':>7} {'mean':>10} {'median':>10}  histogram"]
    for row in summary["classes"]:
        extra = f"  (+{row['nonfinite']} inf/nan)" if row["nonfinite"] else ""
        lines.append(f"{row['name']:>{width}} {row['count']:>7} {row['mean']:>10.4g} {row['median']:>10.4g}  "
                     f"|{_spark(row['hist'])}|{extra}")
    lines.append(f"hardest {len(summary['hardest'])} examples:")
    named = next((f for f in ("file", "key") if summary["hardest"] and f in summary["hardest"][0]), None)
    lines.append(f"{'rank':>5} {'index':>8} {'label':>{width}} {'score':>10}" + (f"  {named}" if named else ""))
    for rank, row in enumerate(summary["hardest"], 1):
        lines.append(f"{rank:>5} {row['index']:>8} {row['name']:>{width}} {row['score']:>10.4g}"
                     + (f"  {row[named]}" if named else ""))
    return "\n".join(lines)


def _displayable(dataset, index: int) -> np.ndarray:
    """An example as an image for people: HxW (grey) or HxWx3 in [0, 1], before any normalisation."""
    images = getattr(dataset, "images", None)
    if images is not None:
        x = images[index].float()
        x = (x if images.dtype.is_floating_point else x / 255.0).numpy()
    elif getattr(dataset, "files", None) is not None and hasattr(dataset, "folder") or \
            getattr(dataset, "shards", None) is not None and hasattr(dataset, "read"):
        import io
        import os

        from PIL import Image
        source = io.BytesIO(bytes(getattr(dataset, "source", dataset).read(index))) if dataset.files is None else \
            os.path.join(dataset.folder, dataset.files[index])  # shards: the image's bytes
        with Image.open(source) as img:
            img = img.convert("RGB")
            img.thumbnail((128, 128))
            return np.asarray(img, dtype=np.float32) / 255.0
    else:
        x = dataset[index][0].float().numpy()
        x = (x - x.min()) / max(float(x.max() - x.min()), 1e-12)
    if x.ndim == 3:
        x = x[0] if x.shape[0] == 1 else np.transpose(x, (1, 2, 0))
    return np.clip(x, 0.0, 1.0)


def show_grid(path: str, dataset, scores: np.ndarray, targets: np.ndarray, k: int, method: str, *,
              class_names: list[str] | None = None) -> None:
    """PNG with the k hardest examples on the top row and the k easiest below, each titled label / score."""
    label_of = (lambda c: class_names[c]) if class_names else str
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = np.argsort(-np.nan_to_num(scores, nan=-np.inf), kind="stable")
    finite_order = order[~np.isnan(scores[order])]
    k = min(k, len(finite_order))
    rows = [("hardest", finite_order[:k]), ("easiest", finite_order[::-1][:k])]
    fig, axes = plt.subplots(2, k, figsize=(1.6 * k + 0.4, 4.6), squeeze=False)
    for r, (name, picks) in enumerate(rows):
        for c, i in enumerate(picks):
            ax = axes[r][c]
            img = _displayable(dataset, int(i))
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(f"{label_of(int(targets[i]))}\n{scores[i]:.3g}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r][0].set_ylabel(name, fontsize=9)
    fig.suptitle(f"{method}: {k} hardest (top) and easiest (bottom)", fontsize=10)
    fig.tight_layout(h_pad=1.2)
    fig.savefig(path, dpi=100)
    plt.close(fig)
