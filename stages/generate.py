"""Stage 'generate': synthetic main + auxiliary channels into a zarr store.

    python stages/generate.py --params params.yaml --out data/raw.zarr

On a SLURM machine whose profile sets ``data_tasks: N`` the samples are
written by a job array of N tasks (``sbatch -W``), each filling its share of
chunks into ``<out>.parts``; this process then checks every chunk and renames
the store onto ``<out>``. Sample i depends only on (seed, i), so the store is
byte-identical however the work was split. Elsewhere the stage generates with
all local cores.

    python stages/generate.py --params params.yaml --out data/raw.zarr --part K --parts N
        is what one array task runs.
"""

import argparse
import shutil
import sys
from pathlib import Path

from virgo_exps.config import load_params
from virgo_exps.entry import stage_main


def parse():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--part", type=int, help="array task: write this part of the chunks into <out>.parts")
    parser.add_argument("--parts", type=int, help="array task: the number of parts")
    parser.add_argument("--workers", type=int, help="processes (default: generate.workers; 0: all cores)")
    args = parser.parse_args()
    if (args.part is None) != (args.parts is None):
        parser.error("--part and --parts go together")
    return args


def run() -> int:
    args = parse()
    params = load_params(args.params)
    cfg = params.generate
    from virgo_exps.study import generate as gen

    if args.part is not None:
        first, last = gen.generate_part(cfg, gen.default_parts_path(args.out), args.part, args.parts, args.workers)
        print(f"generate: part {args.part} of {args.parts} wrote chunks {first}..{last - 1}", flush=True)
        return 0

    from virgo_exps.machines import load_machine

    machine = load_machine()
    print(f"generate: {gen.estimate(cfg, args.workers)['summary']}", flush=True)
    tasks = min(machine.data_tasks, gen.n_chunks_of(cfg)) if machine.kind == "slurm" else 0
    from virgo_exps.stagelog import output_line

    if not tasks:
        gen.generate(cfg, args.out, workers=args.workers)
        print(output_line("generate", args.out), flush=True)
        return 0

    from virgo_exps.launch import launcher
    from virgo_exps.launch.job import JobSpec, dry_run_requested
    from virgo_exps.launch.protocol import WorkerFiles

    parts = gen.default_parts_path(args.out)
    if parts.exists() and not dry_run_requested():
        try:
            gen.ensure_partial(cfg, parts)  # same params: its chunks are right, keep them
        except ValueError:
            print(f"generate: removing {parts}, left by a run with other params", flush=True)
            shutil.rmtree(parts)
    argv = [sys.argv[0], "--params", args.params, "--out", str(args.out)]
    # Requeues after a time-out or preemption: the project's one setting, train.max_requeues.
    spec = JobSpec.job_array("generate", argv, tasks, params.train.max_requeues, WorkerFiles(params=args.params))
    rc = launcher.launch(spec, machine)
    if rc != 0 or dry_run_requested():
        return rc
    gen.finalize(cfg, parts, args.out)
    print(f"generate: {tasks} array tasks done; checked every chunk and published {args.out}", flush=True)
    print(output_line("generate", args.out), flush=True)
    return 0


if __name__ == "__main__":
    stage_main(run, log="generate")
