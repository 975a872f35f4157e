"""The README's code blocks: the synthetic walk-through runs as written; every other `paf-ray`
line parses with the CLI, and the job files it names load with the overrides it gives."""

from __future__ import annotations

import glob
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def readme() -> str:
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        return f.read()


def bash_blocks(text: str) -> list[tuple[str, str]]:
    """(the HTML comment right above it or "", body) of every ```bash block."""
    return [(m.group(1) or "", m.group(2)) for m in
            re.finditer(r"(?:<!-- (\S+) -->\n)?```bash\n(.*?)```", text, re.S)]


def command_lines(body: str) -> list[list[str]]:
    """The block's commands as argument lists: continuations joined, comments dropped."""
    joined = body.replace("\\\n", " ")
    return [shlex.split(line, comments=True) for line in joined.splitlines() if line.strip()
            and not line.lstrip().startswith("#")]


def test_every_paf_ray_line_of_the_readme_parses_and_its_job_files_load():
    from paf_ray.cli import build_parser
    from paf_ray.config import load_config

    parser = build_parser()
    seen = 0
    for _, body in bash_blocks(readme()):
        for argv in command_lines(body):
            if argv[0] != "paf-ray":
                continue
            args = parser.parse_args(argv[1:])  # SystemExit (a test failure) on an unknown command or flag
            seen += 1
            config = getattr(args, "config", None) or getattr(args, "job", None)
            if config and config.startswith("jobs/"):
                load_config(os.path.join(REPO, config), args.overrides)  # its --set keys exist and validate
            cluster = getattr(args, "cluster", None)
            if cluster:
                assert os.path.exists(os.path.join(REPO, cluster)), cluster
    assert seen >= 10


# What `paf-ray run` may print at default verbosity: its own lines, the training workers' progress
# lines (Ray prefixes them with the worker), and the metrics table. A line of Ray's own bookkeeping
# (a timestamped INFO/WARNING record, "Reporting training result ...", the PreemptionWatcher's
# restarts line) fails the test: `--verbose` is where those belong.
OWN_LINE = re.compile(r"^(\[paf-ray\] |(\x1b\[\d+m)?\(RayTrainWorker pid=\d+(, ip=\S+)?\)(\x1b\[0m)? \[stage\d|\|)")
RUN_LINES_MAX = 30  # the smoke run's 2 stages x 2 steps print 25 today


def test_the_synthetic_walk_through_runs_as_written_and_the_run_prints_no_ray_bookkeeping(tmp_path):
    """The block marked readme-run, one command at a time, in a fresh folder with the job files and
    test images beside it."""
    [body] = [body for mark, body in bash_blocks(readme()) if mark == "readme-run"]
    for folder in ("jobs", "tests"):
        os.symlink(os.path.join(REPO, folder), tmp_path / folder)
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
           "TQDM_DISABLE": "1"}
    logs = {}
    for line in body.replace("\\\n", " ").splitlines():
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", line], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=900)
        assert done.returncode == 0, line + "\n" + done.stdout[-3000:] + done.stderr[-3000:]
        logs[shlex.split(line, comments=True)[1]] = done.stdout + done.stderr
    [run] = glob.glob(str(tmp_path / "runs" / "smoke-*"))
    with open(os.path.join(run, "summary.json"), encoding="utf-8") as f:
        summary = json.load(f)
    assert [s["stage"] for s in summary["stages"]] == ["stage0-adapt", "stage1-finetune"]
    overlays = os.listdir(tmp_path / "preds" / "overlay")
    assert len(overlays) == len(glob.glob(os.path.join(REPO, "tests", "data", "bdd100k-images", "*.jpg")))
    assert "| score |" in logs["eval"]  # eval printed its metrics table

    printed = logs["run"].splitlines()
    noise = [line for line in printed if not OWN_LINE.match(line)]
    assert not noise, "lines that are not paf-ray's own in a run at default verbosity:\n" + "\n".join(noise)
    assert len(printed) <= RUN_LINES_MAX, "\n".join(printed)


@pytest.mark.parametrize("doc", sorted(glob.glob(os.path.join(REPO, "docs", "*.md"))) + [os.path.join(REPO, "README.md")])
def test_local_links_of_the_docs_point_at_files(doc):
    text = open(doc, encoding="utf-8").read()
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" in target:
            continue
        assert os.path.exists(os.path.join(os.path.dirname(doc), target)), f"{doc}: broken link {target}"
