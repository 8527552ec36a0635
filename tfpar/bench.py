"""`tfpar bench`: tfpar against one device, MirroredStrategy and raw DTensor.

Every configuration trains the same MLP (`baselines.build_mlp`) from the
same initial weights on the same batches in the same order with the same
Adam:

* `single`: plain Keras on one device;
* `mirrored`: Keras under `tf.distribute.MirroredStrategy` (what `fit` runs
  per batch), over as many devices as each mesh has;
* `mirrored_loop`: the same, trained by a hand-written `strategy.run` loop;
* `dtensor_raw`: the MLP written directly on DTensor (`baselines.DTensorRaw`),
  on each mesh: the floor;
* `tfpar`: the Keras MLP built in `TensorParallel(mesh).scope()`, stepped by
  the compiled train function `model.fit` runs per batch, on each mesh.

Configurations take turns, one step each, in an order that rotates every
round, so a slow spell of the machine falls on all of them alike; warm-up
rounds (tracing) are not timed. Reported per configuration: the median step
time (host batch in, loss back on the host), samples/s, the bytes of
parameters and of optimizer state on the fullest device (read from the real
per-device copies or DTensor shards), and the final loss: the mean squared
error of the trained weights on a held-out batch, computed on the host the
same way for every configuration.
"""

import json
import math
import os
import re
import statistics
import time

__all__ = ["add_parser", "run", "run_bench", "DEFAULT_MESHES"]

DEFAULT_MESHES = ("1x2", "1x4", "2x2")


# --- command line ---------------------------------------------------------------


def add_parser(subparsers):
    """Registers `tfpar bench` on an argparse sub-parser collection."""
    p = subparsers.add_parser(
        "bench",
        help="time tfpar against one device, MirroredStrategy and raw DTensor",
        description=(
            "Trains one MLP as single-device Keras, under MirroredStrategy, as a hand-written "
            "DTensor program and with tfpar on each mesh; prints median step time, samples/s, "
            "bytes per device and final loss."
        ),
    )
    p.add_argument("--mesh", action="append", default=None, metavar="SHAPE",
                   help="a tfpar mesh, e.g. 1x4 or batch=2,model=2; repeat for several "
                        f"(default: {' '.join(DEFAULT_MESHES)})")
    p.add_argument("--hidden", type=int, default=2048, help="features of every layer (default 2048)")
    p.add_argument("--layers", type=int, default=4, help="Dense layers (default 4)")
    p.add_argument("--batch", type=int, default=256, help="global batch size (default 256)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per configuration (default 20)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--seed", type=int, default=0, help="initial weights and data (default 0)")
    p.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON")
    p.add_argument("--plot", default=None, metavar="PATH", help="write a PNG plot")
    p.add_argument("--markdown", default=None, metavar="PATH", help="write the table as markdown")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)
    return p


def run(args):
    """`tfpar bench` from parsed arguments; returns the exit code."""
    from tfpar.devices import mesh_size, prepare_devices

    meshes = args.mesh or list(DEFAULT_MESHES)
    prepare_devices(max(mesh_size(m) for m in meshes))
    run_bench(
        meshes,
        hidden=args.hidden,
        layers=args.layers,
        batch=args.batch,
        steps=args.steps,
        warmup=args.warmup,
        seed=args.seed,
        json_path=args.json,
        plot_path=args.plot,
        markdown_path=args.markdown,
        progress=not args.no_progress,
    )
    return 0


# --- tfpar's configuration ----------------------------------------------------------------


class TfparTrainer:
    """The Keras MLP laid out by `TensorParallel(mesh)`, stepped as `fit` steps it.

    `step()` makes one call of the model's compiled train function, the
    function `model.fit` calls per batch: the next host batch is laid out on
    the mesh (sharded on the data axis) and one compiled step runs there.
    """

    def __init__(self, mesh, weights, x, y, *, batch, layers):
        import tensorflow as tf

        import tfpar
        from tfpar import baselines

        self._constant = tf.constant
        self.tp = tfpar.TensorParallel(mesh)
        with self.tp.scope():
            self.model = baselines.build_mlp(x.shape[1], layers)
            self.model.set_weights(weights)
            baselines._compile(self.model)
            # Adam's state is made now, eagerly and laid out like its
            # variables, as `fit` does before its first step.
            self.model.optimizer.build(self.model.trainable_variables)
        self.tp.shard(self.model)
        self.model.make_train_function()
        self._function = self.model.train_function
        self._batches = baselines.HostBatches(x, y, batch)

    def step(self):
        xb, yb = next(self._batches)
        with self.tp.scope():
            logs = self._function([(self._constant(xb), self._constant(yb))])
        return float(logs["loss"])

    def get_weights(self):
        return self.model.get_weights()

    def bytes_per_device(self):
        report = self.tp.memory_report(self.model)
        return report["per_device_param_bytes"], report["per_device_optimizer_bytes"]


# --- the run ------------------------------------------------------------------------


class _Config:
    def __init__(self, name, mesh, devices, make):
        self.name, self.mesh, self.devices, self.make = name, mesh, devices, make
        self.trainer = None
        self.times = []

    @property
    def label(self):
        return f"{self.name} {self.mesh}"


def _configs(meshes, devices, weights, x, y, batch, layers):
    from tfpar import baselines
    from tfpar.devices import mesh_size
    from tfpar.mesh import DeviceMesh

    configs = [_Config("single", "1x1", 1,
                       lambda: baselines.KerasTrainer(weights, x, y, batch=batch, layers=layers))]
    strategies = {}
    for n in sorted({mesh_size(m) for m in meshes}):
        if n < 2:
            continue

        def strategy(n=n):
            if n not in strategies:
                strategies[n] = baselines.mirrored_strategy(devices[:n])
            return strategies[n]

        configs.append(_Config(
            "mirrored", f"{n}x1", n,
            lambda s=strategy: baselines.KerasTrainer(weights, x, y, batch=batch, layers=layers, strategy=s()),
        ))
        configs.append(_Config(
            "mirrored_loop", f"{n}x1", n,
            lambda s=strategy: baselines.MirroredCustomLoop(weights, x, y, batch=batch, layers=layers,
                                                            strategy=s()),
        ))
    for spec in meshes:
        size = mesh_size(spec)

        def mesh(spec=spec, size=size):
            return DeviceMesh.parse(spec, devices=devices[:size])

        label = "x".join(str(s) for s in mesh().shape)
        configs.append(_Config(
            "dtensor_raw", label, size,
            lambda m=mesh: baselines.DTensorRaw(m(), weights, x, y, batch=batch),
        ))
        configs.append(_Config(
            "tfpar", label, size,
            lambda m=mesh: TfparTrainer(m(), weights, x, y, batch=batch, layers=layers),
        ))
    return configs


def _median(values):
    return statistics.median(values) if values else float("nan")


def _quantile(values, q):
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = q * (len(ordered) - 1)
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def run_bench(meshes=DEFAULT_MESHES, *, hidden=2048, layers=4, batch=256, steps=20, warmup=2, seed=0,
              json_path=None, plot_path=None, markdown_path=None, progress=True, console=None):
    """Runs the benchmark; returns the results dict (the JSON of API.md).

    Args:
        meshes: mesh texts for dtensor_raw and tfpar, e.g. `["1x2", "2x2"]`.
        hidden, layers: the MLP (`layers` Dense layers of `hidden` units).
        batch: global batch size; every mesh's data axis must divide it.
        steps: timed steps per configuration (at least 1).
        warmup: untimed steps per configuration first (tracing happens here).
        seed: initial weights and data.
        json_path, plot_path, markdown_path: where to write the JSON, the PNG
            and the markdown table, if given.
        progress: show a `rich` progress bar.
        console: a `rich.console.Console` for the bar and the table.

    The process must have devices for the largest mesh (`prepare_devices`).
    """
    import numpy as np
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from tfpar import baselines
    from tfpar.devices import list_devices, mesh_size

    if steps < 1 or warmup < 0:
        raise ValueError(f"tfpar bench needs steps >= 1 and warmup >= 0. Received: steps={steps}, warmup={warmup}.")
    meshes = list(meshes)
    if console is None:
        console = Console(stderr=True)
        if not console.is_terminal:
            console = Console(stderr=True, width=160)
    need = max(mesh_size(m) for m in meshes)
    import tensorflow as tf

    kind = "GPU" if tf.config.list_physical_devices("GPU") else "CPU"
    devices = list_devices(kind)
    if len(devices) < need:
        raise RuntimeError(
            f"tfpar bench needs {need} {kind} devices for mesh(es) {meshes} and TensorFlow has "
            f"{len(devices)}; call tfpar.devices.prepare_devices({need}) first thing in the process."
        )

    distinct = max(1, min(warmup + steps, 8))
    x, y = baselines.make_data(hidden, batch, distinct + 1, seed=seed)
    x_eval, y_eval = x[distinct * batch:], y[distinct * batch:]
    x, y = x[: distinct * batch], y[: distinct * batch]
    weights = baselines.build_mlp(hidden, layers, seed=seed).get_weights()
    initial_loss = baselines.mlp_loss(weights, x_eval, y_eval)
    configs = _configs(meshes, devices, weights, x, y, batch, layers)

    columns = [TextColumn("[bold]{task.description:<24}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    total = len(configs) * (1 + warmup + steps)
    started = time.perf_counter()
    with Progress(*columns, console=console, disable=not progress, transient=False) as bar:
        task = bar.add_task("building", total=total)
        for c in configs:
            bar.update(task, description=f"build {c.label}")
            c.trainer = c.make()
            bar.advance(task)
        for r in range(warmup + steps):
            timed = r >= warmup
            shift = r % len(configs)
            for c in configs[shift:] + configs[:shift]:
                bar.update(task, description=f"{'step' if timed else 'warm-up'} {c.label}")
                t0 = time.perf_counter()
                c.trainer.step()
                elapsed = time.perf_counter() - t0
                if timed:
                    c.times.append(elapsed)
                bar.advance(task)
    wall = time.perf_counter() - started

    results = _results(configs, batch, x_eval, y_eval)
    results["settings"] = {
        "hidden": hidden, "layers": layers, "batch": batch, "steps": steps, "warmup": warmup, "seed": seed,
        "meshes": meshes, "device_type": kind, "cpu_count": os.cpu_count(),
        "initial_loss": initial_loss, "wall_s": wall,
        "versions": _versions(),
    }
    results["targets"] = _targets(results["configs"], layers, hidden)
    console.print(table(results))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(results, f, indent=2)
    if plot_path:
        plot(results, plot_path)
    if markdown_path:
        with open(markdown_path, "w") as f:
            f.write(markdown(results) + "\n")
    return results


def _versions():
    from tfpar.demo import versions

    return versions()


def _results(configs, batch, x_eval, y_eval):
    from tfpar import baselines

    rows = []
    for c in configs:
        params, state = c.trainer.bytes_per_device()
        median = _median(c.times)
        rows.append({
            "name": c.name,
            "mesh": c.mesh,
            "devices": c.devices,
            "step_time_s": median,
            "samples_per_s": batch / median,
            "per_device_param_bytes": int(params),
            "per_device_optimizer_bytes": int(state),
            "final_loss": baselines.mlp_loss(c.trainer.get_weights(), x_eval, y_eval),
            "step_time_p25_s": _quantile(c.times, 0.25),
            "step_time_p75_s": _quantile(c.times, 0.75),
            "step_times_s": list(c.times),
        })
    single = next(r for r in rows if r["name"] == "single")
    for row in rows:
        row["ratio_to_single"] = row["step_time_s"] / single["step_time_s"]
        raw = _find(rows, "dtensor_raw", mesh=row["mesh"])
        if row["name"] == "tfpar" and raw is not None:
            row["ratio_to_dtensor_raw"] = row["step_time_s"] / raw["step_time_s"]
        mirrored = _find(rows, "mirrored", devices=row["devices"])
        if row["name"] in ("tfpar", "dtensor_raw") and mirrored is not None:
            row["speedup_over_mirrored"] = mirrored["step_time_s"] / row["step_time_s"]
    return {"configs": rows}


def _find(rows, name, **where):
    for row in rows:
        if row["name"] == name and all(row[k] == v for k, v in where.items()):
            return row
    return None


def _replicated_bytes(layers, hidden, single_optimizer_bytes, single_param_bytes):
    """What tfpar keeps whole on every device: row-layer biases with their two
    Adam moments, and the optimizer's scalars (step count, learning rate)."""
    from tfpar import baselines

    rows = sum(1 for s in baselines.mlp_styles(layers) if s == "row")
    scalars = single_optimizer_bytes - 2 * single_param_bytes
    return rows * hidden * 4 * 3 + scalars


def _targets(rows, layers, hidden):
    """The issue's three goals, each with what was measured."""
    out = []
    for row in rows:
        if row["name"] == "tfpar" and "ratio_to_dtensor_raw" in row:
            out.append({
                "target": f"tfpar {row['mesh']} step time within 5% of dtensor_raw",
                "value": row["ratio_to_dtensor_raw"], "limit": 1.05,
                "met": row["ratio_to_dtensor_raw"] <= 1.05,
            })
    tp4 = _find(rows, "tfpar", mesh="1x4")
    mirrored4 = _find(rows, "mirrored", devices=4)
    if tp4 is not None and mirrored4 is not None:
        out.append({
            "target": "tfpar 1x4 at least 2x faster than MirroredStrategy on 4 devices",
            "value": tp4["speedup_over_mirrored"], "limit": 2.0,
            "met": tp4["speedup_over_mirrored"] >= 2.0,
        })
    single = _find(rows, "single")
    total = single["per_device_param_bytes"] + single["per_device_optimizer_bytes"]
    extra = _replicated_bytes(layers, hidden, single["per_device_optimizer_bytes"], single["per_device_param_bytes"])
    for row in rows:
        if row["name"] == "tfpar" and re.fullmatch(r"1x\d+", row["mesh"]):
            n = row["devices"]
            bound = total / n + extra
            used = row["per_device_param_bytes"] + row["per_device_optimizer_bytes"]
            out.append({
                "target": f"tfpar {row['mesh']} param+optimizer bytes per device <= 1/{n} of single + replicated biases",
                "value": used, "limit": bound, "met": used <= bound,
            })
    return out


# --- output ----------------------------------------------------------------------


def _mib(n):
    return f"{n / 2**20:,.2f}"


def table(results):
    """A `rich` table of the results."""
    from rich.table import Table

    s = results.get("settings", {})
    title = (f"tfpar bench: {s.get('layers')}x{s.get('hidden')} MLP, batch {s.get('batch')}, "
             f"{s.get('steps')} timed steps, {s.get('device_type')} devices")
    t = Table(title=title)
    for column in ("config", "mesh", "dev", "step ms (median)", "p25-p75 ms", "samples/s", "x single",
                   "x raw", "vs mirrored", "param MiB/dev", "opt MiB/dev", "final loss"):
        t.add_column(column, justify="left" if column in ("config", "mesh") else "right")
    for r in results["configs"]:
        t.add_row(
            r["name"], r["mesh"], str(r["devices"]),
            f"{r['step_time_s'] * 1e3:,.1f}",
            f"{r['step_time_p25_s'] * 1e3:,.0f}-{r['step_time_p75_s'] * 1e3:,.0f}",
            f"{r['samples_per_s']:,.0f}",
            f"{r['ratio_to_single']:.2f}",
            f"{r['ratio_to_dtensor_raw']:.3f}" if "ratio_to_dtensor_raw" in r else "",
            f"{r['speedup_over_mirrored']:.2f}x" if "speedup_over_mirrored" in r else "",
            _mib(r["per_device_param_bytes"]), _mib(r["per_device_optimizer_bytes"]),
            f"{r['final_loss']:.6f}",
        )
    return t


def markdown(results):
    """The results as a markdown table (the README's)."""
    lines = ["| config | mesh | devices | step ms (median) | p25–p75 ms | samples/s | × single | × dtensor_raw "
             "| speed-up over mirrored | param MiB/device | optimizer MiB/device | final loss |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results["configs"]:
        raw = f"{r['ratio_to_dtensor_raw']:.3f}" if "ratio_to_dtensor_raw" in r else ""
        vs = f"{r['speedup_over_mirrored']:.2f}×" if "speedup_over_mirrored" in r else ""
        lines.append(
            f"| {r['name']} | {r['mesh']} | {r['devices']} | {r['step_time_s'] * 1e3:,.1f} "
            f"| {r['step_time_p25_s'] * 1e3:,.0f}–{r['step_time_p75_s'] * 1e3:,.0f} | {r['samples_per_s']:,.0f} "
            f"| {r['ratio_to_single']:.2f} | {raw} | {vs} | {_mib(r['per_device_param_bytes'])} "
            f"| {_mib(r['per_device_optimizer_bytes'])} | {r['final_loss']:.6f} |"
        )
    if results.get("targets"):
        lines.append("")
        for t in results["targets"]:
            value, limit = t["value"], t["limit"]
            text = (f"{value:,} bytes, bound {limit:,.0f}" if "bytes" in t["target"]
                    else f"{value:.3f}, limit {limit:.2f}")
            lines.append(f"- {'met' if t['met'] else 'MISSED'}: {t['target']} ({text})")
    return "\n".join(lines)


def plot(results, path):
    """A PNG: median step time (p25-p75 bars) and bytes per device, by configuration."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    rows = results["configs"]
    labels = [f"{r['name']}\n{r['mesh']}" for r in rows]
    positions = list(range(len(rows)))
    colors = {"single": "#7f7f7f", "mirrored": "#d62728", "mirrored_loop": "#ff9896",
              "dtensor_raw": "#1f77b4", "tfpar": "#2ca02c"}
    color = [colors.get(r["name"], "#9467bd") for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(8, 0.9 * len(rows) + 2), 8), sharex=True)
    medians = [r["step_time_s"] * 1e3 for r in rows]
    low = [m - r["step_time_p25_s"] * 1e3 for m, r in zip(medians, rows)]
    high = [r["step_time_p75_s"] * 1e3 - m for m, r in zip(medians, rows)]
    top.bar(positions, medians, color=color, yerr=[low, high], capsize=3)
    top.set_ylabel("median step time (ms)")
    s = results.get("settings", {})
    top.set_title(f"tfpar bench: {s.get('layers')}x{s.get('hidden')} MLP, batch {s.get('batch')}, "
                  f"{s.get('device_type', '')} devices (bars: p25-p75)")
    params = [r["per_device_param_bytes"] / 2**20 for r in rows]
    state = [r["per_device_optimizer_bytes"] / 2**20 for r in rows]
    bottom.bar(positions, params, color=color, label="parameters")
    bottom.bar(positions, state, bottom=params, color=color, alpha=0.45, hatch="//", label="optimizer state")
    bottom.set_ylabel("MiB on the fullest device")
    bottom.legend()
    bottom.set_xticks(positions)
    bottom.set_xticklabels(labels, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)
    return path
