# Data: prepared image shards and latents, shared by every experiment (they run once).


rule prepare_data:
    input:
        job_inputs("prepare_data"),
    output:
        job("prepare_data").markers,
    params:
        block=job_params("prepare_data"),
        cmd=job_cmd("prepare_data"),
        overlays=OVERLAYS,
    threads: THREADS
    conda:
        DOD_ENV
    log:
        "logs/prepare_data.log",
    shell:
        "{params.cmd}{params.overlays} > {log} 2>&1"


rule extract_latents:
    input:
        job_inputs("extract_latents"),
    output:
        job("extract_latents").markers,
    params:
        block=job_params("extract_latents"),
        cmd=job_cmd("extract_latents"),
        overlays=OVERLAYS,
    threads: THREADS
    conda:
        DOD_ENV
    log:
        "logs/extract_latents.log",
    shell:
        "{params.cmd}{params.overlays} > {log} 2>&1"
