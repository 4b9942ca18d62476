# Training: one network per training experiment (experiments with `weights_from` borrow one).
# The command resumes from state/train/<exp>/ (outside the declared outputs); on SIGUSR1/SIGTERM
# (Slurm's warning signal before the time limit, or preemption) it checkpoints and exits 75,
# and a retry or requeue resumes it.


rule train_stage1:
    input:
        job_inputs("train_stage1"),
    output:
        P.weights_path("{exp}"),
    params:
        block=job_params("train_stage1"),
        cmd=job_cmd("train_stage1"),
    log:
        "logs/{exp}/train_stage1.log",
    resources:
        # One process per GPU through `accelerate launch` (`dod train --processes`, the job's
        # total). The slurm profile sets gpu; slurm-multinode also sets nodes, mpi and
        # launcher="srun ..." so that one task per node starts the launcher with its node rank.
        gpu=0,
        nodes=1,
        launcher="",
    shell:
        # exec: Slurm's warning signal (USR1) must reach the trainer, not a wrapping shell.
        "exec {resources.launcher} {params.cmd}{DOD_OPTS} --processes {resources.gpu} --nodes {resources.nodes} > {log} 2>&1"
