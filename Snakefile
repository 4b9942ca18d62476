# Diffusion on Diffusion (DoD): the reproduction pipeline.
#
#   snakemake --cores 2                       # embedded default, locally
#   snakemake --profile slurm                 # on a Slurm GPU cluster
#   snakemake --profile slurm --configfile params/paper.yaml   # ImageNet-256 at paper scale
#
# Stages, commands, inputs, outputs and parameter keys are defined once in dodlib/pipeline.py;
# the rules below only bind them to Snakemake (dvc.yaml is generated from the same definition).

include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/training.smk"
include: "workflow/rules/sampling.smk"
include: "workflow/rules/evaluation.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/workspace.smk"


rule all:
    default_target: True
    input:
        P.find(PARAMS, "report").markers,
        # with eval.export_npz: every stage's samples as ADM .npz too
        [s.markers[0] for s in P.stages(PARAMS) if s.rule.startswith("export_npz_stage")],
