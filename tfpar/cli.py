"""The `tfpar` command: info, demo, bench, launch."""

import argparse
import os
import sys

__all__ = ["main"]


def _add_info(sub):
    p = sub.add_parser("info", help="devices, TF/Keras versions, what mesh would be made")
    p.add_argument("--devices", type=int, default=None,
                   help="split the first CPU (or GPU) into this many logical devices first")
    p.set_defaults(run=_run_info)


def _run_info(args):
    from tfpar.demo import versions
    from tfpar.devices import prepare_devices

    if args.devices:
        prepare_devices(args.devices)
    import tensorflow as tf

    import tfpar

    for name, version in versions().items():
        print(f"{name:12s} {version}")
    print("physical devices:")
    for d in tf.config.list_physical_devices():
        print(f"  {d.name} ({d.device_type})")
    mesh = tfpar.DeviceMesh.parse(str(len(_logical_default())))
    print(f"default mesh:  {mesh!r} over {mesh.devices}")
    return 0


def _logical_default():
    import tensorflow as tf

    for kind in ("GPU", "TPU", "CPU"):
        devices = tf.config.list_logical_devices(kind)
        if devices:
            return devices
    return []


def _add_demo(sub):
    p = sub.add_parser("demo", help="the main job: train tensor-parallel, compare with unsharded")
    p.add_argument("--mesh", default="2x2", help="mesh shape, e.g. 2x2, 1x4, batch=2,model=2")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--hidden", type=int, default=128)
    p.set_defaults(run=_run_demo)


def _run_demo(args):
    from tfpar.demo import run_demo

    return run_demo(mesh=args.mesh, epochs=args.epochs, batch_size=args.batch_size, hidden=args.hidden)


COMMANDS = [_add_info, _add_demo]


def _optional_commands():
    """Sub-commands living in their own modules: each has add_parser(sub)."""
    import importlib

    for module in ("tfpar.bench", "tfpar.launch"):
        try:
            yield importlib.import_module(module).add_parser
        except ImportError as e:
            if e.name != module:
                raise


def main(argv=None):
    """Runs `tfpar <command>`; returns the exit code."""
    # Before TensorFlow loads: hide its C++ start-up and cost-model chatter
    # (set TF_CPP_MIN_LOG_LEVEL yourself to see it).
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    parser = argparse.ArgumentParser(
        prog="tfpar", description="Tensor parallelism for Keras 3 models on TensorFlow DTensor."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS + list(_optional_commands()):
        add(sub)
    args = parser.parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
