"""The `paf-ray` command (also `python -m paf_ray`).

Arguments are declared here; each command's handler is a function of its area's ``commands``
module (one table below: ``set_defaults(handler=...)``). Handlers import what they run when they
run, so `paf-ray --help` loads neither torch nor Ray. Every handler takes the parsed
``argparse.Namespace`` and returns an exit code.
"""

from __future__ import annotations

import argparse
import os
import sys

from paf_ray import commands
from paf_ray.data import commands as data_commands
from paf_ray.eval import commands as eval_commands
from paf_ray.models import commands as model_commands
from paf_ray.train import commands as train_commands
from paf_ray.tune import commands as tune_commands


def size_arg(text: str) -> tuple[int, int]:
    """'640x360' -> (640, 360): the WxH arguments."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected WIDTHxHEIGHT, e.g. 640x360") from None
    if w < 1 or h < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: width and height must be positive")
    return w, h


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be > 0")
    return value


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.stages.0.epochs=2 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="paf-ray", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # --- data -------------------------------------------------------------------
    data = sub.add_parser("data", help="dataset tools: synth, index, check")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")

    p = dsub.add_parser("synth", help="write a synthetic dataset in the official BDD100K layout")
    p.add_argument("--out", required=True, help="dataset root to create")
    p.add_argument("--images", type=int, default=120, help="number of frames in all")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=size_arg, default=(640, 360), help="WxH of the frames (default 640x360)")
    p.add_argument("--val-fraction", type=float, default=0.25)
    p.set_defaults(handler=data_commands.synth_command)

    p = dsub.add_parser("index", help="build the dataset index once; runs and Tune trials reuse it")
    p.add_argument("root", help="dataset root (path or URI, e.g. file:///data/bdd100k, s3://bucket/bdd100k)")
    p.add_argument("--index-dir", default=None,
                   help="where to keep the index (path or URI; default ROOT/.paf_ray_index); runs read it "
                        "from there when data.index_dir names the same place")
    p.add_argument("--out", default=None, help="also write the records as JSON lines to this file")
    p.add_argument("--split", action="append", choices=["train", "val"], help="splits (default both)")
    p.add_argument("--keep-overlap", action="store_true", help="keep 10k/100k frames that cross splits")
    p.add_argument("--tasks", default=None, metavar="T1,T2",
                   help="the tasks whose labels to index, as the runs' model.tasks (default: a config's default)")
    p.set_defaults(handler=data_commands.index_command)

    p = dsub.add_parser("check", help="check a dataset root; exits non-zero on errors")
    p.add_argument("root")
    p.add_argument("--split", action="append", choices=["train", "val"])
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--max-image-pixels", type=positive_int, default=None, metavar="N",
                   help="an image or mask with more pixels (width x height) is an error, never decoded "
                        "(default: data.max_image_pixels' default, docs/reliability.md)")
    p.set_defaults(handler=data_commands.check_command)

    # --- model ------------------------------------------------------------------
    p = sub.add_parser("inspect", help="parameter counts per module and trainable counts for a stage")
    p.add_argument("config")
    p.add_argument("--stage", choices=["adapt", "finetune"], default=None, help="default: the first stage")
    p.add_argument("--json", action="store_true")
    _add_set(p)
    p.set_defaults(handler=model_commands.inspect_command)

    # --- training ---------------------------------------------------------------
    p = sub.add_parser("run", help="train: run the config's stages on Ray Train")
    p.add_argument("config")
    p.add_argument("--out", default=None,
                   help="storage for runs, a path or URI (default: ray.storage_path, else ~/paf_ray_runs)")
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="RUN",
                   help="continue the run named RUN (a folder under the storage); bare: the newest run of "
                        "this config's name. Without it every run gets a new folder <name>-<time>-<id>")
    _add_set(p)
    p.set_defaults(handler=train_commands.run_command)

    p = sub.add_parser("demo", help="the end-to-end demo on synthetic BDD100K (pretrain, adapt, finetune, eval)")
    p.add_argument("--out", default="demo_out", help="output folder (default ./demo_out)")
    p.add_argument("--config", default=None, help="demo config (default: the packaged jobs/demo.yaml)")
    _add_set(p)
    p.set_defaults(handler=train_commands.demo_command)

    p = sub.add_parser("pretrain", help="make a pretrained backbone checkpoint on the config's training frames")
    p.add_argument("config", help="the config whose data and model.backbone are used")
    p.add_argument("--method", choices=["supervised", "simclr", "moco"], required=True,
                   help="image-level labels (torchvision layout), or self-supervised SimCLR / MoCo v2 (their layouts)")
    p.add_argument("--out", required=True, help="checkpoint file to write (path or URI)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default 200)")
    p.add_argument("--batch-size", type=int, default=None, help="frames per batch (default 32)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate, one-cycle (default 3e-3)")
    p.add_argument("--size", type=size_arg, default=None, help="WxH the frames are resized to (default 160x96)")
    p.add_argument("--seed", type=int, default=0)
    _add_set(p)
    p.set_defaults(handler=train_commands.pretrain_command)

    p = sub.add_parser("study", help="the comparison grid (checkpoints x paradigms x adapters x seeds) as Tune trials")
    p.add_argument("config", help="a study file (a config with a `study:` section)")
    p.add_argument("--out", default=None, help="study folder (default <ray.storage_path or ./runs>/<name>)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted study in --out")
    p.add_argument("--quick", action="store_true", help="apply the file's study.quick overrides (CI: tiny, one seed)")
    p.add_argument("--report", action="store_true",
                   help="only write the results of the cells finished so far in --out (while it runs, or after)")
    _add_set(p)
    p.set_defaults(handler=commands.study_command)

    p = sub.add_parser("eval", help="evaluate a checkpoint on the val split")
    p.add_argument("checkpoint")
    p.add_argument("--json", action="store_true")
    _add_set(p)
    p.set_defaults(handler=train_commands.eval_command)

    # --- scoring ----------------------------------------------------------------
    p = sub.add_parser("score", help="score predictions in a task's official format (paf-ray score TASK --help)",
                       add_help=False)
    p.add_argument("task", metavar="TASK", help="a registered task (`paf-ray score --help` lists them)")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="the task's arguments: ground truth, predictions")
    p.set_defaults(handler=eval_commands.score_command)

    # --- tuning -----------------------------------------------------------------
    p = sub.add_parser("tune", help="Ray Tune + Optuna search over adapters, prompts and backbones")
    p.add_argument("config")
    p.add_argument("--out", default=None,
                   help="the sweep folder, a path or URI (default: a new <name>-<time>-<id> under ray.storage_path, "
                        "else ~/paf_ray_runs)")
    p.add_argument("--resume", action="store_true",
                   help="continue the sweep in --out (without --out: the newest sweep of this config's name)")
    _add_set(p)
    p.set_defaults(handler=tune_commands.tune_command)

    # --- jobs -------------------------------------------------------------------
    p = sub.add_parser("submit", help="submit a job file to a Ray cluster (Ray Jobs SDK)")
    p.add_argument("config")
    p.add_argument("--address", default=None, help="dashboard address, e.g. http://127.0.0.1:8265")
    p.add_argument("--wait", action="store_true", help="stream the logs; exit non-zero if the job fails")
    p.add_argument("--submission-id", default=None)
    check = p.add_mutually_exclusive_group()
    check.add_argument("--check", action="store_true",
                       help="only check that the job fits the cluster (its nodes and its autoscaler's node types, "
                            "or --cluster FILE); submit nothing")
    check.add_argument("--no-check", action="store_true", help="submit without checking that the job fits")
    p.add_argument("--cluster", default=None, metavar="FILE",
                   help="check against this cluster file (ray up YAML or KubeRay manifest) instead of the live cluster")
    _add_set(p)
    p.set_defaults(handler=commands.submit_command)

    cluster = sub.add_parser("cluster", help="cluster files: does a job fit a cluster?")
    csub = cluster.add_subparsers(dest="cluster_command", required=True, metavar="COMMAND")
    p = csub.add_parser("check", help="say whether a job file fits a cluster file; exit 1 if not")
    p.add_argument("cluster", help="a Ray cluster launcher YAML (cluster/aws.yaml) or a KubeRay RayCluster/RayJob")
    p.add_argument("job", help="a job file (jobs/*.yaml)")
    _add_set(p)
    p.set_defaults(handler=commands.cluster_check_command)

    # --- inference --------------------------------------------------------------
    p = sub.add_parser("predict", help="predict on images: overlays and each task's outputs in its official format")
    p.add_argument("checkpoint")
    p.add_argument("inputs", nargs="+", help="image files, folders or globs")
    p.add_argument("--out", required=True)
    p.add_argument("--score-thr", type=float, default=0.3)
    p.add_argument("--distributed", action="store_true", help="batch inference with Ray Data")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--workers", type=int, default=1, help="--distributed: most model actors in the pool")
    p.add_argument("--stop-on-bad-image", action="store_true",
                   help="stop at the first unreadable image (default: skip it, count it, exit 1 at the end)")
    p.add_argument("--max-image-pixels", type=positive_int, default=None, metavar="N",
                   help="an image with more pixels (width x height) is a bad image, never decoded "
                        "(default: the checkpoint's data.max_image_pixels)")
    p.set_defaults(handler=commands.predict_command)

    p = sub.add_parser("export", help="export the deployable model (adapters merged)")
    p.add_argument("checkpoint")
    p.add_argument("--format", choices=["torchscript", "onnx"], default="torchscript")
    p.add_argument("--out", required=True)
    p.add_argument("--frame-size", type=size_arg, default=(1280, 720), help="WxH of the frames the exported model takes")
    p.add_argument("--sample", default=None, help="image for the PyTorch-vs-export check (default: a synthetic frame)")
    p.add_argument("--json", action="store_true", help="also print the check report as JSON")
    p.set_defaults(handler=commands.export_command)

    # --- benchmarks -------------------------------------------------------------
    p = sub.add_parser("bench", help="side-by-side benchmarks (bench.json, bench.md)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--out", default="bench_out")
    p.add_argument("--cases", default=None, metavar="A,B",
                   help="cases to run, in this order (data, step, compile, ray_overhead, lv_overhead, gpu; "
                        "default all, on CPU all but compile); step, compile and gpu need no Ray")
    p.add_argument("--config", default=None,
                   help="instead of the cases: adapt vs finetune step time of this config, side by side "
                        "(with --compare: the finetune step of the config vs the config with the changes)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="with --config: override a config key")
    p.add_argument("--compare", action="append", default=[], metavar="KEY=VALUE",
                   help="with --config: time the finetune step with these changes against the config as is")
    p.add_argument("--steps", type=int, default=5, help="with --config: timed steps of each side")
    p.add_argument("--threads", type=int, default=None, help="with --config: torch threads")
    p.set_defaults(handler=commands.bench_command)

    return parser


def _add_global_flags(parser: argparse.ArgumentParser, top: bool = True) -> None:
    """`--debug` and `--verbose` before or after the command."""
    parser.add_argument("--debug", action="store_true", default=False if top else argparse.SUPPRESS,
                        help="on an error, show the full traceback instead of one line")
    parser.add_argument("--verbose", action="store_true", default=False if top else argparse.SUPPRESS,
                        help="show every line of Ray's own logging (kept to warnings and errors by default)")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                if sub.add_help:  # `score` hands its arguments to the task's own parser
                    _add_global_flags(sub, top=False)


def error_line(error: BaseException) -> str:
    """The one line a user sees for an error: its first non-empty message line, else its type."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    _add_global_flags(parser)
    args = parser.parse_args(argv)
    if args.verbose:  # read by paf_ray.runtime.ray when a handler first imports it
        os.environ["PAF_RAY_VERBOSE"] = "1"
    command = " ".join(filter(None, [args.command, getattr(args, "data_command", None),
                                     getattr(args, "cluster_command", None)]))
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # every error is one line naming the file or key; --debug shows the rest
        if args.debug:
            raise
        # a ConfigError comes from paf_ray.config, imported by then; cli itself does not import it (--help speed)
        loader = sys.modules.get("paf_ray.config.loader")
        is_config = loader is not None and isinstance(e, loader.ConfigError)
        print(f"paf-ray {command}: {'config error: ' if is_config else ''}{error_line(e)}  [--debug shows the traceback]",
              file=sys.stderr)
        return 2 if is_config else 1


if __name__ == "__main__":
    sys.exit(main())
