# Training: one network per training experiment (experiments with `weights_from` borrow one), and
# for experiments that list stages in `stages.finetune`, the paired prior cache and fine-tuned
# network of each such stage.
# `dod train` resumes from state/train/<exp>/ (outside the declared outputs); on SIGUSR1/SIGTERM/
# SIGURG (Slurm's warning signal before the time limit, or preemption) it checkpoints and exits 75,
# and a retry or requeue resumes it.


for _k in [1] + FINETUNED_STAGES:

    rule:
        name:
            f"train_stage{_k}"
        input:
            job_inputs(f"train_stage{_k}"),
        output:
            P.weights_path("{exp}", _k),
        params:
            block=job_params(f"train_stage{_k}"),
            cmd=job_cmd(f"train_stage{_k}"),
            overlays=OVERLAYS,
        threads: THREADS
        conda:
            DOD_ENV
        log:
            f"logs/{{exp}}/train_stage{_k}.log",
        resources:
            # One process per GPU through `accelerate launch` (`dod train --processes`, the job's
            # total). The slurm profile sets gpu; slurm-multinode also sets nodes, mpi and
            # launcher="srun ..." so that one task per node starts the launcher with its node rank.
            gpu=0,
            nodes=1,
            launcher="",
        shell:
            # exec: Slurm's warning signal must reach the trainer, not a wrapping shell.
            "exec {resources.launcher} {params.cmd}{params.overlays} --processes {resources.gpu} --nodes {resources.nodes} > {log} 2>&1"


for _k in FINETUNED_STAGES:

    rule:
        name:
            f"pair_priors_stage{_k}"
        input:
            job_inputs(f"pair_priors_stage{_k}"),
        output:
            P.marker(P.pairs_dir("{exp}", _k)),
        params:
            block=job_params(f"pair_priors_stage{_k}"),
            cmd=job_cmd(f"pair_priors_stage{_k}"),
            overlays=OVERLAYS,
        threads: THREADS
        conda:
            DOD_ENV
        log:
            f"logs/{{exp}}/pair_priors_stage{_k}.log",
        resources:
            gpu=0,  # the slurm profile's GPUs: one sampling process each
        shell:
            "{params.cmd}{params.overlays} --processes {resources.gpu} > {log} 2>&1"
