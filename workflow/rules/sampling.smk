# Sampling: stage k of an experiment, conditioned on stage k-1's prior cache (k >= 2).
# One rule per stage so that each can be targeted (`snakemake sample_stage2`) and given resources.

for _k in range(1, MAX_STAGES + 1):

    rule:
        name:
            f"sample_stage{_k}"
        input:
            job_inputs(f"sample_stage{_k}"),
        output:
            P.marker(P.stage_dir("{exp}", _k)),
        params:
            block=job_params(f"sample_stage{_k}"),
            cmd=job_cmd(f"sample_stage{_k}"),
            overlays=OVERLAYS,
        threads: THREADS
        conda:
            DOD_ENV
        log:
            f"logs/{{exp}}/sample_stage{_k}.log",
        resources:
            gpu=0,  # the slurm profile's GPUs: one process each, every process takes its share of shards
        shell:
            "{params.cmd}{params.overlays} --processes {resources.gpu} > {log} 2>&1"
