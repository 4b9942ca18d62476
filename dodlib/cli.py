"""`dod <stage>`: one command per pipeline stage, each writing exactly its declared outputs.

Every command reads the same params.yaml (plus optional overlays) and validates it whole before
doing any work. Paths come from dodlib.pipeline, so Snakemake, DVC and a person at a shell all
run the same thing.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from . import pipeline as P
from .config import ConfigError, Params, load_params
from .errors import DataError

log = logging.getLogger("dod")


def _load(args) -> Params:
    """The validated params (file, overlays, `--set` values); then the numerics are pinned
    (dodlib/runtime.py) before the command imports torch or numpy."""
    from .runtime import pin

    params = load_params(args.params, args.overlay or (), sets=args.set or ())
    pin(params.base.runtime.threads, params.base.runtime.cpu_isa)
    return params


def _device(args):
    """The device of a command that runs a network (float32 work there may use TF32 on CUDA)."""
    import torch

    from .compute import allow_tf32

    allow_tf32()
    if args.device:
        return torch.device(args.device)
    if not torch.cuda.is_available():
        return torch.device("cpu")
    # One GPU per process under `accelerate launch` (--processes N).
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


# ---- stage commands ---------------------------------------------------------------------------


def cmd_prepare_data(args) -> None:
    from .data import prepare_data

    params = _load(args)
    prepare_data(params.base.data, P.data_dir())


def cmd_extract_latents(args) -> None:
    from .io import save_json
    from .latents import extract_latents
    from .tokenizers import build_tokenizer

    params = _load(args)
    exp = params.base
    tokenizer = build_tokenizer(exp.tokenizer, _device(args))
    summary = {}
    for split in ("train", "val"):
        meta = extract_latents(tokenizer, exp.data, exp.tokenizer, f"{P.data_dir()}/{split}", f"{P.latents_dir()}/{split}")
        summary[split] = {k: meta[k] for k in ("num_latents", "latent_shape", "channel_mean", "channel_std")}
    save_json(f"{P.latents_dir()}/summary.json", summary)


def cmd_train_features(args) -> None:
    from .evaluation import train_feature_net_stage

    params = _load(args)
    train_feature_net_stage(params.base, P.data_dir(), P.features_dir(), device=_device(args))


def cmd_reference_stats(args) -> None:
    from .evaluation import reference_stats_stage

    params = _load(args)
    reference_stats_stage(params.base, P.data_dir(), P.features_dir(), P.reference_dir(), device=_device(args))


def _relaunch_distributed(args) -> None:
    """Re-execute this command under `accelerate launch` when more than one process is asked for
    and we are not already one of its workers (one per GPU; on a CPU-only machine the processes
    form a gloo group). Multi-node (Slurm, one task per node started by srun): the node rank and
    the main node's address come from Slurm's environment."""
    world = args.processes
    if world % args.nodes:
        raise SystemExit(f"dod {args.command}: --processes {world} (all nodes) is not a multiple of --nodes {args.nodes}")
    if world <= 1 or "LOCAL_RANK" in os.environ:
        return
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
              "--num_processes", str(world), "--num_machines", str(args.nodes)]
    if args.nodes > 1:
        import subprocess

        hosts = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
                               capture_output=True, text=True, check=True).stdout.split()
        launch += ["--machine_rank", os.environ.get("SLURM_NODEID", "0"),
                   "--main_process_ip", hosts[0], "--main_process_port", os.environ.get("DOD_MAIN_PORT", "29500")]
    os.execv(sys.executable, launch + ["-m", "dodlib.cli"] + sys.argv[1:])


def cmd_train(args) -> None:
    from .train import EXIT_NON_FINITE, EXIT_PREEMPTED, NonFiniteTraining, Preempted, train

    params = _load(args)  # before any relaunch: a bad file fails once, in this process
    _relaunch_distributed(args)
    exp = params.experiment(args.experiment)
    if exp.weights_from:
        raise ConfigError(f"experiments.{exp.name}.weights_from: this experiment does not train")
    k = args.stage
    if k > 1 and k not in exp.stages.finetuned():
        raise ConfigError(f"--stage {k}: experiments.{exp.name}.stages.finetune has no stage {k} "
                          f"(fine-tuned stages: {exp.stages.finetuned() or 'none'})")
    fine_tuning = {} if k == 1 else {"init_weights": P.weights_path(exp.name, k - 1), "pairs_dir": P.pairs_dir(exp.name, k)}
    try:
        train(exp, f"{P.latents_dir()}/train", P.train_dir(exp.name, k), P.state_dir("train", exp.name, k if k > 1 else 0),
              stage=k, stop_after_images=args.stop_after_images, **fine_tuning)
    except Preempted as err:
        log.warning("%s", err)
        sys.exit(EXIT_PREEMPTED)
    except NonFiniteTraining as err:
        log.error("%s", err)
        sys.exit(EXIT_NON_FINITE)


def cmd_sample(args) -> None:
    from .priors import PriorCache, RealPriors
    from .sample import sample_stage
    from .tokenizers import build_tokenizer

    params = _load(args)
    _relaunch_distributed(args)
    exp = params.experiment(args.experiment)
    k = args.stage
    if not 1 <= k <= exp.stages.count:
        raise ConfigError(f"--stage {k}: experiments.{exp.name} has stages 1..{exp.stages.count}")
    prior = None
    if k >= 2:
        if k == 2 and exp.sample.prior_source == "real":
            prior = RealPriors(f"{P.latents_dir()}/train")  # reconstruction of training images
        else:
            prior = PriorCache(P.stage_dir(exp.name, k - 1))
    device = _device(args)
    sample_stage(exp, k, P.sampling_weights_path(params, exp.name, k), P.stage_dir(exp.name, k),
                 P.state_dir("sample", exp.name, k), build_tokenizer(exp.tokenizer, device), prior=prior,
                 batch_size=args.batch_size, device=device)


def cmd_pair_priors(args) -> None:
    from .priors import PriorCache
    from .sample import pair_priors

    params = _load(args)
    _relaunch_distributed(args)
    exp = params.experiment(args.experiment)
    k = args.stage
    if exp.weights_from or k not in exp.stages.finetuned():
        raise ConfigError(f"--stage {k}: experiments.{exp.name} does not fine-tune stage {k}")
    previous = PriorCache(P.pairs_dir(exp.name, k - 1)) if k > 2 else None
    pair_priors(exp, k, P.weights_path(exp.name, k - 1), f"{P.latents_dir()}/train", P.pairs_dir(exp.name, k),
                P.state_dir("pairs", exp.name, k), previous=previous, batch_size=args.batch_size,
                device=_device(args))


def cmd_evaluate(args) -> None:
    from .stage_metrics import evaluate_stage

    params = _load(args)
    exp = params.experiment(args.experiment)
    evaluate_stage(exp, args.stage, P.stage_dir(exp.name, args.stage), P.reference_dir(), P.features_dir(),
                   P.sampling_weights_path(params, exp.name, args.stage), P.metrics_path(exp.name, args.stage),
                   train_images=params.experiment(exp.trainer).train_images(args.stage), device=_device(args))


def cmd_export_npz(args) -> None:
    from .export import export_npz

    params = _load(args)
    exp = params.experiment(args.experiment)
    if not 1 <= args.stage <= exp.stages.count:
        raise ConfigError(f"--stage {args.stage}: experiments.{exp.name} has stages 1..{exp.stages.count}")
    out = args.output or P.export_path(exp.name, args.stage)
    summary = export_npz(P.stage_dir(exp.name, args.stage), out)
    log.info("wrote %s: arr_0 uint8 %s, arr_1 labels (%.1f MB)", out, summary["shape"], summary["bytes"] / 1e6)


def cmd_probe(args) -> None:
    from .probe import probe_stage

    params = _load(args)
    exp = params.experiment(args.experiment)
    probe_stage(P.weights_path(exp.trainer), P.latents_dir(), P.probe_path(exp.name), exp_name=exp.name)


def cmd_evaluate_snapshots(args) -> None:
    from .snapshots import evaluate_snapshots_stage
    from .tokenizers import build_tokenizer

    params = _load(args)
    exp = params.experiment(args.experiment)
    device = _device(args)
    evaluate_snapshots_stage(exp, P.train_dir(exp.name), P.reference_dir(), P.features_dir(),
                             P.state_dir("snapshots", exp.name), P.snapshots_path(exp.name),
                             build_tokenizer(exp.tokenizer, device), device=device)


def cmd_report(args) -> None:
    from .report import build_report

    params = _load(args)
    build_report(params, Path(P.results_dir(params)), manifest=Path(P.report_manifest_path(params)),
                 provenance=Path(P.report_provenance_path(params)))


def _dvc_yaml_command(overlays) -> str:
    """The command that writes the dvc.yaml of params.yaml with these overlays."""
    return "dod dvc-yaml" + "".join(f" --overlay {o}" for o in overlays or ())


def cmd_dvc_yaml(args) -> None:
    params = _load(args)
    if args.set:
        raise ConfigError("dod dvc-yaml: --set values would not reach DVC (it reads the params files); "
                          "put them in params.yaml or an overlay")
    text = P.dvc_yaml(params, args.overlay or ())
    target = Path(args.output)
    if args.check:
        current = target.read_text() if target.exists() else ""
        if current != text:
            sys.exit(f"{target} is stale: run `{_dvc_yaml_command(args.overlay)}` to regenerate it from "
                     "dodlib/pipeline.py")
        print(f"{target} is up to date")
        return
    from .io import atomic_path

    with atomic_path(target) as tmp:
        tmp.write_text(text)
    print(f"wrote {target} ({len(P.stages(params))} stages)")


def cmd_dvc_adopt(args) -> None:
    """Record the workspace's outputs in dvc.lock (`dvc commit --force`) after a complete Snakemake
    run (its onsuccess hook, workflow/rules/workspace.smk), so that DVC then calls it up to date too.
    Only for the configuration DVC reads: params.yaml and the overlays of this run, with dvc.yaml
    generated for them; otherwise (--config values, another dvc.yaml) it says why and does nothing.
    Never fails the run: Snakemake's results stand either way."""
    import subprocess

    params = _load(args)
    overlays = args.overlay or ()
    why_not = None
    if args.set:
        why_not = "this run used --config values, which DVC does not read"
    elif not Path(".dvc").is_dir() or not Path(args.dvc_yaml).exists():
        why_not = "no DVC project here"
    elif Path(args.dvc_yaml).read_text() != P.dvc_yaml(params, overlays):
        why_not = (f"{args.dvc_yaml} is not the one for this configuration (run "
                   f"`{_dvc_yaml_command(overlays)}` to make it so)")
    if why_not:
        print(f"dod dvc-adopt: not recording the outputs in DVC: {why_not}")
        return
    proc = subprocess.run(["dvc", "commit", "--force", "--quiet"], capture_output=True, text=True)
    if proc.returncode:
        print(f"dod dvc-adopt: `dvc commit --force` failed ({proc.returncode}); DVC will rerun what it "
              f"cannot match:\n{proc.stdout}{proc.stderr}")
    else:
        print("dod dvc-adopt: outputs recorded in dvc.lock; `dvc status` agrees with Snakemake")


def cmd_validate(args) -> None:
    params = _load(args)
    for s in P.stages(params):
        print(f"{s.name:40s} {s.cmd}")
    print(f"{args.params}: valid ({len(params.experiments)} experiments)")


# ---- argument parsing ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dod", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="<stage>")

    def add(name, func, help_, experiment=False, stage=False):
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--params", default=P.PARAMS_FILE, help="params file (default: params.yaml)")
        p.add_argument("--overlay", action="append", help="YAML overlay merged over the params file (repeatable)")
        p.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="one value over the params file and overlays, e.g. train.lr=0.001 (YAML value; repeatable)")
        p.add_argument("--device", default="", help="torch device (default: cuda if available, else cpu)")
        p.add_argument("-v", "--verbose", action="store_true")
        if experiment:
            p.add_argument("--experiment", required=True, help="experiment name from params.yaml")
        if stage:
            p.add_argument("--stage", type=int, required=True, help="sampling stage k (1 = no prior)")
        p.set_defaults(func=func)
        return p

    add("prepare-data", cmd_prepare_data, "prepare_data: raw images -> uint8 shards (train/val)")
    add("extract-latents", cmd_extract_latents, "extract_latents: images -> latent moments (both flips)")
    add("train-features", cmd_train_features, "train_feature_net: the data-set feature network for metrics")
    add("reference-stats", cmd_reference_stats, "reference_stats: detector statistics of the real images")
    def add_processes(p):
        p.add_argument("--processes", type=int, default=1,
                       help="processes (GPUs) over all nodes, like the job's total `gpu` resource; "
                            ">1 re-launches through `accelerate launch`")
        p.add_argument("--nodes", type=int, default=1, help="nodes (multi-node: one srun task per node)")

    p = add("train", cmd_train, "train_stage{k}: train an experiment's stage-1 network, or fine-tune stage k >= 2 "
            "on its paired priors (resumes automatically)", experiment=True)
    p.add_argument("--stage", type=int, default=1, help="1 (default), or a stage listed in stages.finetune")
    p.add_argument("--stop-after-images", type=int, default=None, help="checkpoint and exit early (testing)")
    add_processes(p)
    p = add("sample", cmd_sample, "sample_stage{k}: stage-k samples into a prior cache", experiment=True, stage=True)
    p.add_argument("--batch-size", type=int, default=None, help="compute batch (results do not depend on it)")
    add_processes(p)
    p = add("pair-priors", cmd_pair_priors, "pair_priors_stage{k}: training latents noised to t0 and regenerated "
            "by stage k-1, the paired prior cache that fine-tunes stage k", experiment=True, stage=True)
    p.add_argument("--batch-size", type=int, default=None, help="compute batch (results do not depend on it)")
    add_processes(p)
    add("evaluate", cmd_evaluate, "evaluate_stage{k}: metrics JSON for a stage's samples", experiment=True, stage=True)
    p = add("export-npz", cmd_export_npz, "export_npz_stage{k}: a stage's samples as an ADM-format .npz "
            "(arr_0 images, arr_1 labels) for OpenAI's evaluator", experiment=True, stage=True)
    p.add_argument("--output", default=None, help="where to write it (default: artifacts/exp/<exp>/export/stage<k>.npz)")
    add("probe", cmd_probe, "probe: linear probe (top-1) of the LEM bottleneck on held-out real latents",
        experiment=True)
    add("evaluate-snapshots", cmd_evaluate_snapshots,
        "evaluate_snapshots: metric of intermediate EMA snapshots (training efficiency)", experiment=True)
    add("report", cmd_report, "report: tables, figures and index into results/")
    p = add("dvc-yaml", cmd_dvc_yaml, "write dvc.yaml from the pipeline definition")
    p.add_argument("--output", default="dvc.yaml")
    p.add_argument("--check", action="store_true", help="fail if the file differs instead of writing it")
    p = add("dvc-adopt", cmd_dvc_adopt, "after a complete Snakemake run: record its outputs in dvc.lock "
            "(Snakemake runs it when its report ran)")
    p.add_argument("--dvc-yaml", default="dvc.yaml")
    add("validate", cmd_validate, "validate params.yaml and list the pipeline's jobs")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        args.func(args)
    except ConfigError as err:
        sys.exit(f"dod {args.command}: invalid configuration: {err}")
    except FileNotFoundError as err:
        sys.exit(f"dod {args.command}: {err}")
    except DataError as err:
        sys.exit(f"dod {args.command}: bad input data: {err}")


if __name__ == "__main__":
    main()
