"""What the user sees: a rank-0 progress bar (loss terms, img/s, step time, ETA), TensorBoard scalars,
wandb where `logging.wandb` is set (scalars, sample grids, the config; a resumed run continues the
same wandb run), `metrics.jsonl` (every step) and a loss-curve PNG at the end. Other ranks only
report warnings."""
from __future__ import annotations

import json
import logging
import os
import sys
import time

log = logging.getLogger("engine")

CURVE_TERMS = ("loss", "velocity", "alignment", "cls")
EVAL_CURVE = {"fid": "FID", "sfid": "sFID", "inception_score": "Inception Score", "precision": "precision",
              "recall": "recall", "encoder_fd": "encoder Frechet distance", "class_accuracy": "class accuracy"}


class Monitor:
    def __init__(self, cfg, is_main: bool, output_dir: str):
        self.cfg, self.is_main, self.output_dir = cfg, is_main, output_dir
        self.bar = None
        self.writer = None
        self.wandb = None
        self.metrics_path = os.path.join(output_dir, "metrics.jsonl")
        self.eval_path = os.path.join(output_dir, "eval.jsonl")
        if not logging.getLogger().handlers:
            logging.basicConfig(level=logging.INFO if is_main else logging.WARNING,
                                format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
        if not is_main:
            return
        os.makedirs(output_dir, exist_ok=True)
        if cfg.logging.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(os.path.join(output_dir, "tensorboard"))
            except ImportError as error:
                log.warning("TensorBoard disabled: %s", error)

    # -- text -----------------------------------------------------------------------------------

    def info(self, message: str) -> None:
        if self.is_main:
            if self.bar is not None:
                self.bar.write(message)
            else:
                log.info(message)

    def warn(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write("WARNING " + message)
        else:
            log.warning(message)

    # -- progress -------------------------------------------------------------------------------

    def start(self, step: int, total: int, wandb_run_id: str | None = None) -> None:
        """Start the progress bar, and the wandb run (`wandb_run_id`: the one a resumed run continues)."""
        self.started = time.time()
        if self.is_main and self.cfg.logging.wandb is not None and self.wandb is None:
            self._start_wandb(wandb_run_id, step)
        if self.is_main and self.cfg.logging.progress_bar:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=step, desc="train", dynamic_ncols=True, file=sys.stderr,
                            smoothing=0.1)

    def _start_wandb(self, run_id: str | None, step: int) -> None:
        import wandb

        w = self.cfg.logging.wandb
        name = w.name or os.path.basename(os.path.normpath(self.output_dir))
        self.wandb = wandb.init(project=w.project, entity=w.entity, name=name, mode=w.mode, tags=w.tags or None,
                                config=self.cfg.to_dict(), dir=self.output_dir,
                                id=run_id, resume="must" if run_id else None)
        self.info(f"wandb run {self.wandb.id} ({self.wandb.settings.mode}, project {w.project})"
                  + (f", resumed at step {step}" if run_id else ""))

    @property
    def wandb_run_id(self) -> str | None:
        """The wandb run's id (stored in checkpoints so that a resume continues the run)."""
        return None if self.wandb is None else self.wandb.id

    def log_step(self, step: int, metrics: dict) -> None:
        if not self.is_main:
            return
        record = {"step": step, "time": time.time(), **metrics}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix_str(
                f"loss {metrics['loss']:.4f} v {metrics['velocity']:.4f} align {metrics['alignment']:.4f} "
                f"cls {metrics['cls']:.4f} | {metrics['images_per_s']:.1f} img/s "
                f"{metrics['step_time'] * 1000:.0f} ms/step", refresh=False)
        if step % self.cfg.logging.log_every == 0:
            scalars = {f"train/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
            if self.writer is not None:
                for key, value in scalars.items():
                    self.writer.add_scalar(key, value, step)
            if self.wandb is not None:
                self.wandb.log(scalars, step=step)
            if self.bar is None:
                log.info("step %d: %s", step, " ".join(f"{k}={v:.4g}" for k, v in metrics.items()
                                                       if isinstance(v, float)))

    def log_eval(self, step: int, metrics: dict) -> None:
        """One evaluation (engine.evaluate's metrics) at `step`: eval.jsonl, TensorBoard `eval/*`, wandb."""
        if not self.is_main:
            return
        record = {"step": step, "time": time.time(), **metrics}
        with open(self.eval_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        scalars = {f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, step)
            self.writer.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def image(self, name: str, path: str, step: int) -> None:
        if not self.is_main:
            return
        if self.writer is not None:
            import numpy as np
            from PIL import Image
            self.writer.add_image(f"samples/{os.path.splitext(name)[0].split('_step')[0]}",
                                  np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")
        if self.wandb is not None:
            import wandb
            self.wandb.log({"samples": wandb.Image(path)}, step=step)
        self.info(f"sample grid {path}")

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close(self) -> None:
        self.close_bar()
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None

    # -- curves ---------------------------------------------------------------------------------

    def loss_curve(self) -> str | None:
        """Plot metrics.jsonl (loss terms against step) to loss_curve.png, with a panel per evaluation
        metric of eval.jsonl in the rows below."""
        records = read_metrics(self.metrics_path)
        if not records:
            return None
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = [r["step"] for r in records]
        evals = read_metrics(self.eval_path)
        eval_keys = [k for k in EVAL_CURVE if any(k in r for r in evals)]
        cols = len(CURVE_TERMS)
        rows = 1 + -(-len(eval_keys) // cols)  # the losses, then rows of evaluation curves
        fig, grid = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
        axes = list(grid.flat)
        for ax in axes[cols + len(eval_keys):]:
            ax.axis("off")
        for ax, key in zip(axes[cols:], eval_keys):
            points = [(r["step"], r[key]) for r in evals if key in r]
            ax.plot([p[0] for p in points], [p[1] for p in points], "o-", lw=1.5, color="C3")
            ax.set_title(f"eval: {EVAL_CURVE[key]}")
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        for ax, term in zip(axes, CURVE_TERMS):
            values = [r.get(term, float("nan")) for r in records]
            ax.plot(steps, values, lw=0.8, alpha=0.4, label="per step")
            window = max(1, len(values) // 20)
            if window > 1:
                smooth = [sum(values[max(0, i - window + 1): i + 1]) / len(values[max(0, i - window + 1): i + 1])
                          for i in range(len(values))]
                ax.plot(steps, smooth, lw=1.5, label=f"mean of {window}")
            ax.set_title(term)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(self.output_dir, "loss_curve.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        self.info(f"loss curve {path}")
        return path


def read_metrics(path: str) -> list[dict]:
    """The per-step records of metrics.jsonl; a resumed run's later records replace earlier ones."""
    if not os.path.exists(path):
        return []
    by_step = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                record = json.loads(line)
                by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]
