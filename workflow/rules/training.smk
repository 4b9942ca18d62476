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
    shell:
        "{params.cmd}{DOD_OPTS} > {log} 2>&1"
