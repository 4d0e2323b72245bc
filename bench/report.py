"""Regenerate the README's performance tables from the newest results, and beside each result its
table as markdown and its chart as a PNG.

    python -m bench.report [--results bench/results] [--readme README.md]

Each table names its device, versions and date; where no result exists the README says
"not measured yet". Nothing here measures anything.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re


def _load_all(results_dir: str, kind: str) -> list[dict]:
    """Every `kind-*.json` result, oldest first by its recorded date (file times do not survive a clone)."""
    payloads = []
    for path in glob.glob(os.path.join(results_dir, f"{kind}-*.json")):
        with open(path) as f:
            payload = json.load(f)
        payload["_path"] = path
        payloads.append(payload)
    return sorted(payloads, key=lambda p: (p["environment"]["date"], os.path.getmtime(p["_path"])))


def newest(results_dir: str, kind: str) -> dict | None:
    payloads = _load_all(results_dir, kind)
    return payloads[-1] if payloads else None


def newest_per_device(results_dir: str, kind: str) -> list[dict]:
    """The newest result of `kind` for each device, by device name."""
    per_device = {p["environment"]["device"]: p for p in _load_all(results_dir, kind)}
    return [per_device[device] for device in sorted(per_device)]


def data_tables(payloads: list[dict]) -> str:
    """The data-loading table of each device's result."""
    from bench.data import markdown

    if not payloads:
        return "Not measured yet (`python -m bench.data`).\n"
    return "\n".join(markdown(p) + f"\n({os.path.basename(p['_path'])})\n" for p in payloads)


def kernel_table(payload: dict | None) -> str:
    if payload is None:
        return "Not measured yet: no GPU run has been recorded (`bash bench/gpu_all.sh` on a GPU machine).\n"
    env, ceilings = payload["environment"], payload["ceilings"]
    lines = [f"{env['device']}, torch {env['torch']}, Triton {env['triton']}, {env['date']}; measured ceilings: "
             f"copy {ceilings['copy_bytes_per_s'] / 1e9:.0f} GB/s, bf16 matmul "
             f"{ceilings['matmul_flop_per_s'] / 1e12:.0f} TFLOP/s"
             + (f" ({os.path.basename(payload['_path'])})." if "_path" in payload else "."), "",
             "| op | shape | pass | variant | time (us) | vs reference | GB/s or TFLOP/s | of peak |",
             "|---|---|---|---|---|---|---|---|"]
    def was_run(result):
        return not all(v.get("skipped", "").startswith("not run") for v in result["variants"])

    not_run = [r for r in payload["results"] if not was_run(r)]
    for result in filter(was_run, payload["results"]):
        for v in result["variants"]:
            if "seconds" not in v:
                lines.append(f"| {result['op']} | {result['shape']} | {result['mode']} | {v['variant']} | "
                             f"skipped: {v['skipped']} | | | |")
                continue
            rate, peak = ((f"{v['gb_per_s']:.0f} GB/s", f"{100 * v['fraction_of_copy_bandwidth']:.0f}%")
                          if "gb_per_s" in v else
                          (f"{v['tflop_per_s']:.0f} TFLOP/s", f"{100 * v['fraction_of_matmul_peak']:.0f}%")
                          if "tflop_per_s" in v else ("", ""))
            ratio = f"{v['speedup_vs_reference']:.2f}x" if "speedup_vs_reference" in v else "-"  # no reference ran
            lines.append(f"| {result['op']} | {result['shape']} | {result['mode']} | {v['variant']} | "
                         f"{v['seconds'] * 1e6:.1f} | {ratio} | {rate} | {peak} |")
    if not_run:
        lines += ["", f"Not run in this call (its time budget ran out): "
                      + "; ".join(f"{r['op']} {r['shape']} {r['mode']}" for r in not_run) + "."]
    return "\n".join(lines) + "\n"


def train_step_table(payload: dict | None) -> str:
    if payload is None:
        return "Not measured yet: no GPU run has been recorded (`bash bench/gpu_all.sh` on a GPU machine).\n"
    from bench.train_step import markdown

    return markdown(payload) + f"\n({os.path.basename(payload['_path'])})\n"


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _save(plt, fig, payload: dict) -> str:
    """The figure as a PNG beside the result it draws; returns its path."""
    fig.tight_layout()
    path = payload["_path"].replace(".json", ".png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_table(payload: dict | None, table: str) -> None:
    """The markdown table as a .md file beside the result it is made from."""
    if payload is not None:
        with open(payload["_path"].replace(".json", ".md"), "w") as f:
            f.write(table)


def train_step_chart(payload: dict | None) -> str | None:
    """img/s of each training-step variant, as a PNG beside the result; returns its path."""
    plt = _pyplot()
    rows = [r for r in (payload or {}).get("variants", []) if "img_per_s" in r]
    if plt is None or not rows:
        return None
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.barh([r["variant"] for r in rows], [r["img_per_s"] for r in rows])
    ax.set_xlabel("img/s")
    ax.set_title(f"{payload['model']} training step, {payload['environment']['device']}")
    return _save(plt, fig, payload)


def kernel_chart(payload: dict | None) -> str | None:
    """Speed-up over the eager reference of every measured variant, per op, shape and pass, as a PNG
    beside the result; returns its path."""
    plt = _pyplot()
    results = [r for r in (payload or {}).get("results", [])
               if any("speedup_vs_reference" in v for v in r["variants"][1:])]
    if plt is None or not results:
        return None
    names = sorted({v["variant"] for r in results for v in r["variants"][1:] if "speedup_vs_reference" in v})
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(results) + 1.5))
    height = 0.8 / len(names)
    for k, name in enumerate(names):
        speedups = [next((v.get("speedup_vs_reference", 0.0) for v in r["variants"] if v["variant"] == name), 0.0)
                    for r in results]
        ax.barh([i + k * height for i in range(len(results))], speedups, height=height, label=name)
    ax.set_yticks([i + (len(names) - 1) * height / 2 for i in range(len(results))])
    ax.set_yticklabels([f"{r['op']} {r['mode']}\n{r['shape']}" for r in results], fontsize=7)
    ax.invert_yaxis()  # the first result on top, as in the table
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("speed-up over the eager reference (measured side by side)")
    ax.set_title(f"kernels, {payload['environment']['device']}")
    ax.legend(fontsize=7)
    return _save(plt, fig, payload)


def model_payloads(results_dir: str) -> list[dict]:
    """The newest modelled result (`python -m bench.model`: model-<preset>-<date>.json) of each device
    preset, oldest preset name first; the regression guard's model-baseline.json is not one."""
    per_preset = {}
    for path in sorted(glob.glob(os.path.join(results_dir, "model-*.json"))):
        with open(path) as f:
            payload = json.load(f)
        if payload.get("kind") != "model":
            continue
        payload["_path"] = path
        current = per_preset.get(payload["device_preset"])
        if current is None or payload["date"] >= current["date"]:
            per_preset[payload["device_preset"]] = payload
    return [per_preset[k] for k in sorted(per_preset)]


def model_sections(payloads: list[dict], readme_preset: str = "h100-sxm") -> dict:
    """The README's modelled sections (the `readme_preset` result: its step table, sensitivity and
    assumptions; its ZeRO projection), each result's full table beside its JSON, and its chart."""
    from bench.model import markdown, zero_table

    for payload in payloads:
        write_table(payload, markdown(payload))
        model_chart(payload)
    chosen = next((p for p in payloads if p["device_preset"] == readme_preset), payloads[-1] if payloads else None)
    if chosen is None:
        missing = "Not modelled yet (`python -m bench.model`).\n"
        return {"model-results": missing, "model-zero-results": missing}
    source = f"\n({os.path.basename(chosen['_path'])}; top ops per variant in the .md beside it)\n"
    return {"model-results": markdown(chosen, top_ops=False, zero=False) + source + model_presets_table(payloads),
            "model-zero-results": (zero_table(chosen) if chosen.get("zero") else "No ZeRO projection in "
                                   "this result (`python -m bench.model --zero-gpus 8,64`).\n") + source}


def model_presets_table(payloads: list[dict]) -> str:
    """Modelled step ms and img/s of each variant on every device preset that has a result."""
    if len(payloads) < 2:
        return ""
    variants = list(payloads[0]["variants"])
    lines = ["", "The same step on each device preset (modelled, not measured; step ms / img/s; same assumptions, "
                 "each preset's own ceilings):", "",
             "| preset | bandwidth | bf16 matmul | " + " | ".join(variants) + " |", "|---|---|---|" + "---|" * len(variants)]
    for p in payloads:
        cells = [f"{1e3 * p['variants'][v]['step_s']:.1f} / {p['variants'][v]['img_per_s']:.0f}"
                 if v in p["variants"] else "-" for v in variants]
        d = p["device"]
        lines.append(f"| {d['device']} | {d['bandwidth'] / 1e12:.2f} TB/s | {d['bf16'] / 1e12:.0f} TFLOP/s | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def model_chart(payload: dict) -> str | None:
    """The modelled step of each variant as bars stacked by category, a PNG beside the result."""
    from bench.model import CATEGORIES

    plt = _pyplot()
    if plt is None or not payload.get("variants"):
        return None
    names = list(payload["variants"])
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(names) + 2.4))
    left = [0.0] * len(names)
    for category in CATEGORIES:
        widths = [1e3 * payload["variants"][n]["categories"][category] for n in names]
        ax.barh(names, widths, left=left, label=category)
        left = [a + b for a, b in zip(left, widths)]
    ax.invert_yaxis()
    ax.set_xlabel("modelled step time (ms), not measured")
    cfg = payload["config"]
    ax.set_title(f"{cfg['model']} batch {cfg['batch']}, modelled {payload['device']['device']}", fontsize=9)
    ax.legend(fontsize=7, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.25))
    return _save(plt, fig, payload)


def replace_section(text: str, name: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- BEGIN {name} -->\n).*?(<!-- END {name} -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"README has no <!-- BEGIN {name} --> ... <!-- END {name} --> section")
    return pattern.sub(lambda m: m.group(1) + body + m.group(2), text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="bench/results")
    parser.add_argument("--readme", default="README.md")
    args = parser.parse_args(argv)
    kernels_payload, step_payload = newest(args.results, "kernels"), newest(args.results, "train_step")
    data_payloads = newest_per_device(args.results, "data")
    train_step_chart(step_payload)
    kernel_chart(kernels_payload)
    sections = {"kernel-results": kernel_table(kernels_payload), "train-step-results": train_step_table(step_payload),
                "data-results": data_tables(data_payloads)}
    sections.update(model_sections(model_payloads(args.results)))
    write_table(kernels_payload, sections["kernel-results"])
    write_table(step_payload, sections["train-step-results"])
    for payload in data_payloads:
        write_table(payload, data_tables([payload]))
    with open(args.readme) as f:
        text = f.read()
    for name, body in sections.items():
        text = replace_section(text, name, body)
    with open(args.readme, "w") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
