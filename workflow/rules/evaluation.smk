# Evaluation: the detector (feature net or Inception), reference statistics of the real data,
# and the metrics of every stage's samples.


if PARAMS.base.eval.detector == "features":

    rule train_feature_net:
        input:
            job_inputs("train_feature_net"),
        output:
            job("train_feature_net").markers,
        params:
            block=job_params("train_feature_net"),
            cmd=job_cmd("train_feature_net"),
            overlays=OVERLAYS,
        threads: THREADS
        conda:
            DOD_ENV
        log:
            "logs/train_feature_net.log",
        shell:
            "{params.cmd}{params.overlays} > {log} 2>&1"


rule reference_stats:
    input:
        job_inputs("reference_stats"),
    output:
        job("reference_stats").markers,
    params:
        block=job_params("reference_stats"),
        cmd=job_cmd("reference_stats"),
        overlays=OVERLAYS,
    threads: THREADS
    conda:
        DOD_ENV
    log:
        "logs/reference_stats.log",
    shell:
        "{params.cmd}{params.overlays} > {log} 2>&1"


for _k in range(1, MAX_STAGES + 1):

    rule:
        name:
            f"evaluate_stage{_k}"
        input:
            job_inputs(f"evaluate_stage{_k}"),
        output:
            P.metrics_path("{exp}", _k),
        params:
            block=job_params(f"evaluate_stage{_k}"),
            cmd=job_cmd(f"evaluate_stage{_k}"),
            overlays=OVERLAYS,
        threads: THREADS
        conda:
            DOD_ENV
        log:
            f"logs/{{exp}}/evaluate_stage{_k}.log",
        shell:
            "{params.cmd}{params.overlays} > {log} 2>&1"


rule probe:
    input:
        job_inputs("probe"),
    output:
        P.probe_path("{exp}"),
    params:
        block=job_params("probe"),
        cmd=job_cmd("probe"),
        overlays=OVERLAYS,
    threads: THREADS
    conda:
        DOD_ENV
    log:
        "logs/{exp}/probe.log",
    shell:
        "{params.cmd}{params.overlays} > {log} 2>&1"


rule evaluate_snapshots:
    input:
        job_inputs("evaluate_snapshots"),
    output:
        P.snapshots_path("{exp}"),
    params:
        block=job_params("evaluate_snapshots"),
        cmd=job_cmd("evaluate_snapshots"),
        overlays=OVERLAYS,
    threads: THREADS
    conda:
        DOD_ENV
    log:
        "logs/{exp}/evaluate_snapshots.log",
    shell:
        "{params.cmd}{params.overlays} > {log} 2>&1"


# ADM-format .npz of a stage's samples (OpenAI's evaluator). In `all` only with eval.export_npz;
# `snakemake --cores 2 export_samples` exports every stage of every experiment in any case.
for _k in range(1, MAX_STAGES + 1):

    rule:
        name:
            f"export_npz_stage{_k}"
        input:
            lambda wc, k=_k: P.export_stage(wc.exp, k).deps + P.export_stage(wc.exp, k).code,
        output:
            P.export_path("{exp}", _k),
        params:
            cmd=lambda wc, k=_k: P.export_stage(wc.exp, k).cmd,
            overlays=OVERLAYS,
        threads: THREADS
        conda:
            DOD_ENV
        log:
            f"logs/{{exp}}/export_npz_stage{_k}.log",
        shell:
            "{params.cmd}{params.overlays} > {log} 2>&1"


rule export_samples:
    input:
        [P.export_path(n, k) for n, e in PARAMS.experiments.items() for k in range(1, e.stages.count + 1)],
