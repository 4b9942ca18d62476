# Report: every table and figure of results/, from the metrics, logs and samples.


rule report:
    input:
        job_inputs("report"),
    output:
        P.report_manifest_path(PARAMS),
        f"{P.results_dir(PARAMS)}/README.md",
        [
            report(f"{P.results_dir(PARAMS)}/{f}", category="Figures")
            for f in P.report_figures(PARAMS)
        ],
    params:
        block=job_params("report"),
        cmd=job_cmd("report"),
        overlays=OVERLAYS,
    threads: THREADS
    conda:
        DOD_ENV
    log:
        "logs/report.log",
    shell:
        "{params.cmd}{params.overlays} > {log} 2>&1"
