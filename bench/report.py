"""Regenerate the README's performance tables from the newest results, and beside each result its
table as markdown and its chart as a PNG.

    python -m bench.report [--results bench/results] [--readme README.md]

Each table names its device, versions and date; where no result exists the README says
"not measured yet". Nothing here measures anything.
"""
from __future__ import annotations

import argparse
import os
import re

from bench.common import model_payloads, newest, newest_per_device
from bench.model import CATEGORIES, prediction_for, zero_table
from bench.model import markdown as model_markdown


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
             "| op | shape | pass | variant | device us | host us | vs reference | GB/s or TFLOP/s | of peak |",
             "|---|---|---|---|---|---|---|---|---|"]
    measured = [v for r in payload["results"] for v in r["variants"] if "seconds" in v]
    if measured and not any("host_seconds" in v for v in measured):
        lines[1:1] = ["", "Timed before host and device were told apart: each time is CUDA events around the call "
                          "alone, which for a call that the host queues more slowly than the GPU runs the L2 flush "
                          "before it is the host's time, not the device's (host us: not kept then)."]
        lines[-2] = lines[-2].replace("| device us | host us |", "| time (us) | host us |")
    else:
        lines[0] += (" Device us: the GPU's time per call (ratios and rates are of it); host us: the host's "
                     "(bench.common.time_call).")
    def was_run(result):
        return not all(v.get("skipped", "").startswith("not run") for v in result["variants"])

    not_run = [r for r in payload["results"] if not was_run(r)]
    for result in filter(was_run, payload["results"]):
        for v in result["variants"]:
            if "seconds" not in v:
                lines.append(f"| {result['op']} | {result['shape']} | {result['mode']} | {v['variant']} | "
                             f"skipped: {v['skipped']} | | | | |")
                continue
            rate, peak = ((f"{v['gb_per_s']:.0f} GB/s", f"{100 * v['fraction_of_copy_bandwidth']:.0f}%")
                          if "gb_per_s" in v else
                          (f"{v['tflop_per_s']:.0f} TFLOP/s", f"{100 * v['fraction_of_matmul_peak']:.0f}%")
                          if "tflop_per_s" in v else ("", ""))
            ratio = f"{v['speedup_vs_reference']:.2f}x" if "speedup_vs_reference" in v else "-"  # no reference ran
            host = f"{v['host_seconds'] * 1e6:.1f}" if "host_seconds" in v else "-"  # results before it was kept
            lines.append(f"| {result['op']} | {result['shape']} | {result['mode']} | {v['variant']} | "
                         f"{v['seconds'] * 1e6:.1f} | {host} | {ratio} | {rate} | {peak} |")
    if not_run:
        lines += ["", "Not run in this call (its time budget ran out): "
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


def model_sections(payloads: list[dict], readme_preset: str = "h100-sxm") -> dict:
    """The README's modelled sections (the `readme_preset` result: its step table, sensitivity and
    assumptions; its ZeRO projection), each result's full table beside its JSON, and its chart."""
    for payload in payloads:
        write_table(payload, model_markdown(payload))
        model_chart(payload)
    chosen = next((p for p in payloads if p["device_preset"] == readme_preset), payloads[-1] if payloads else None)
    if chosen is None:
        missing = "Not modelled yet (`python -m bench.model`).\n"
        return {"model-results": missing, "model-zero-results": missing}
    source = f"\n({os.path.basename(chosen['_path'])}; top ops per variant in the .md beside it)\n"
    return {"model-results": model_markdown(chosen, top_ops=False, zero=False) + source + model_presets_table(payloads),
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


# The measured breakdown columns of bench.train_step and the phases of bench.model's step they are compared
# with (bench.model's "phases" follow bench.train_step's marks; its optimizer phase holds the gradient
# clipping, AdamW and, for trainer-*, DeepSpeed's copies and the EMA update). "data" has no modelled counterpart (the
# model has no loader), so the step is compared less its data wait.
MEASURED_VS_MODELLED = {"encoder": ("encoder",), "forward": ("forward", "loss"), "backward": ("backward",),
                        "optimizer": ("optimizer",)}
COLUMN_NAMES = {"encoder": "encoder", "forward": "fwd+loss", "backward": "backward", "optimizer": "optimizer"}
MODEL_ERROR_LIMIT = 0.20  # beyond it, the model's assumptions need correcting (issue 13)


def _error(modelled: float, measured: float) -> float | None:
    return (modelled - measured) / measured if measured > 0 else None


def model_error_table(step_payload: dict | None, prediction: dict | None) -> str:
    """The model's error per measured variant, (modelled - measured) / measured in signed %, for the
    step (less its data wait) and each phase of MEASURED_VS_MODELLED; errors beyond MODEL_ERROR_LIMIT are
    marked and listed. `prediction`: a bench.model result (`prediction_for`), its variants by the
    measured variants' names."""
    if step_payload is None:
        return ""
    if prediction is None:
        return ("\nNo modelled prediction beside this result (`python -m bench.predict` writes one: "
                "bench/gpu_all.sh runs it with the train stage).\n")
    flag = f"{100 * MODEL_ERROR_LIMIT:.0f}%"
    source = os.path.basename(prediction["_path"]) if "_path" in prediction else "bench.model"
    lines = [f"Model error per variant, (modelled - measured) / measured: bench.model's prediction ({source}, "
             f"{prediction['device']['device']}; bandwidth {prediction['device'].get('bandwidth_from', '?')}, bf16 "
             f"matmul {prediction['device'].get('bf16_from', '?')}) beside the step measured above, less its data "
             "wait (the model has no loader), and per phase: "
             + ", ".join(f"{COLUMN_NAMES[k]} vs modelled {' + '.join(v)}" for k, v in MEASURED_VS_MODELLED.items())
             + f". Errors beyond {flag} are marked !: the model's assumptions need correcting. Each phase is the "
             "longer of the device lane and the host lane (the lane named beside it); 'device lane alone' is the "
             "step's error without the host lane. "
             + (f"The host lane's costs were {prediction['host_costs_source']}: so the errors here are that fit's "
                "residual, not a validation." if prediction.get("host_costs_source") else ""), "",
             "| variant | measured ms | modelled ms | error | device lane alone | "
             + " | ".join(COLUMN_NAMES[k] for k in MEASURED_VS_MODELLED) + " |",
             "|---|---|---|---|---|" + "---|" * len(MEASURED_VS_MODELLED)]
    other = {k: (prediction["config"].get(k), step_payload.get(k)) for k in ("model", "batch", "resolution")
             if prediction["config"].get(k) != step_payload.get(k)}
    if other:  # e.g. a smoke prediction: the errors then say nothing about the model
        lines.insert(1, f"The prediction models another step than was measured (modelled, measured: {other}): "
                        "these errors are not the model's.")

    def cell(error):
        if error is None:
            return "-"
        return f"{100 * error:+.0f}%" + (" !" if abs(error) > MODEL_ERROR_LIMIT else "")

    off, all_errors = [], []
    for row in step_payload["variants"]:
        if "seconds_per_step" not in row:
            continue
        modelled = prediction["variants"].get(row["variant"])
        if modelled is None:
            lines.append(f"| {row['variant']} | not modelled | | | |" + " |" * len(MEASURED_VS_MODELLED))
            continue
        measured = row["breakdown_seconds"]
        measured_step = row["seconds_per_step"] - measured.get("data", 0.0)
        step_error = _error(modelled["step_s"], measured_step)
        if "phase_seconds" in modelled:  # two lanes: each of bench.train_step's phases, the lane that bounds it
            composed, bound = modelled["phase_seconds"], modelled["bound_by"]
            errors = {k: _error(composed[k], measured[k]) if k in measured else None for k in MEASURED_VS_MODELLED}
            lanes = {k: f" ({bound[k]})" for k in MEASURED_VS_MODELLED}
        else:  # a result without the host lane: the device lane's phases
            phases = modelled.get("phases", {})
            errors = {k: _error(sum(phases[p] for p in v), measured[k]) if all(p in phases for p in v) and k in measured
                      else None for k, v in MEASURED_VS_MODELLED.items()}
            lanes = dict.fromkeys(MEASURED_VS_MODELLED, "")
        before = _error(modelled.get("device_step_s", modelled["step_s"]), measured_step)
        all_errors += [e for e in [step_error, *errors.values()] if e is not None]
        lines.append(f"| {row['variant']} | {1e3 * measured_step:.1f} | {1e3 * modelled['step_s']:.1f} | "
                     f"{cell(step_error)} | {cell(before)} | "
                     + " | ".join(cell(e) + lanes[k] for k, e in errors.items()) + " |")
        bad = [f"step {100 * step_error:+.0f}%"] if step_error is not None and abs(step_error) > MODEL_ERROR_LIMIT else []
        bad += [f"{COLUMN_NAMES[k]} {100 * e:+.0f}%" for k, e in errors.items()
                if e is not None and abs(e) > MODEL_ERROR_LIMIT]
        if bad:
            off.append(f"{row['variant']} ({', '.join(bad)})")
    if all_errors:
        rms = (sum(e * e for e in all_errors) / len(all_errors)) ** 0.5
        lines += ["", f"RMS of the errors above (steps and phases): {100 * rms:.1f}%."]
    if off:
        lines += ["", f"Off by more than {flag}: " + "; ".join(off) + ". The model's assumptions need correcting "
                  "(bench/model.py: efficiencies, launch cost, byte counts; its assumptions are listed with its result)."]
    else:
        lines += ["", f"Every modelled figure is within {flag} of the measurement."]
    return "\n" + "\n".join(lines) + "\n"


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
    errors = model_error_table(step_payload, prediction_for(args.results, step_payload))
    if errors:
        print(errors)
    sections = {"kernel-results": kernel_table(kernels_payload),
                "train-step-results": train_step_table(step_payload) + errors, "data-results": data_tables(data_payloads)}
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
